// NpcDialogueClient: a small C++17 client of the npc-sidecar (service npc.v1.NpcDialogue, see
// proto/npc/v1/dialogue.proto) for game engines.
//
//   npc::NpcDialogueClient client("127.0.0.1:50051");
//   npc::v1::TalkRequest request;
//   request.set_character_id("blacksmith");
//   request.set_session_id("slot1/player");
//   request.set_player_line("Got any swords?");
//   npc::CallId id = client.Talk(request,
//       [](const std::string& text) { /* append text (worker thread!) */ },
//       [](const npc::v1::Finished& done) { /* done.emotion(), done.full_text(), done.actions() */ },
//       [](const npc::Error& error) { /* npc::StatusCodeName(error.code), error.message */ });
//   ...
//   client.Cancel(id);  // e.g. the player walked away
//
// Threading. Talk() returns at once: the streaming call runs on a worker thread of its own, and
// every callback of that call runs on that worker thread, never on the thread that called Talk().
// A game must hand the results over to its game thread itself (in Unreal:
// AsyncTask(ENamedThreads::GameThread, ...); see UNREAL.md). Callbacks of one call run one after
// the other, in stream order; callbacks of different calls may run at the same time.
//
// For every call, in this order: on_started (once), on_emotion (once, when the character declares
// emotions: the label comes before the text), on_delta (zero or more times), on_action (zero to 3
// times, after the text), then exactly one of on_finished (the call ended with OK) or on_error (any
// other status, including CANCELLED after Cancel() and DEADLINE_EXCEEDED). A call that fails may
// end with on_error after some of the others ran. Nothing is called after that, and the callbacks
// (with whatever they captured) are destroyed on the worker thread before the call counts as ended.
// Finished::emotion() and Finished::actions() repeat what on_emotion and on_action gave: a game that
// must not act on a reply that then fails acts on Finished::actions() in on_finished instead.
//
// Actions. A character may declare actions (Character::actions(), character.yaml `actions`), e.g.
// sell_item(item, price); the model may take up to 3 in a reply, each a v1::Action with its name
// and typed arguments (ActionArgument: string_value for "string" and "enum" arguments, int_value,
// bool_value; FindArgument() below) and the same arguments as JSON (arguments_json()). The request
// says which values an enum argument may take (AddEntities) and which actions are allowed
// (SetAllowedActions); see TalkRequest in dialogue.proto.
//
// No exceptions are thrown by this API and none are needed to use it (Unreal builds without
// exceptions and RTTI): failures are values, npc::Error {code, message}. Callbacks must not throw.
//
// Blocking calls (ListCharacters, GetServerInfo, the session calls) wait for the server's answer,
// at most their deadline: do not call them on a game's frame thread.
//
// All methods are safe to call from any thread, including from inside a callback, except: do not
// call Wait() on a call from that call's own callbacks, and do not destroy the client from inside
// one of its callbacks (both are detected: Wait returns false, the destructor detaches that
// worker instead of joining it).
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include <grpcpp/support/status_code_enum.h>

#include "npc/v1/dialogue.pb.h"

namespace npc {

// A failed call: the gRPC status code and the server's one-line message (see the status code
// table at the top of dialogue.proto). code == OK means no error.
struct Error {
  grpc::StatusCode code = grpc::StatusCode::OK;
  std::string message;

  bool ok() const { return code == grpc::StatusCode::OK; }
};

// "OK", "CANCELLED", "NOT_FOUND", ... (the names in dialogue.proto); "UNKNOWN_CODE_<n>" otherwise.
const char* StatusCodeName(grpc::StatusCode code);

// The outcome of a blocking call: `value` is meaningful only when error.ok().
template <class T>
struct Result {
  Error error;
  T value{};

  bool ok() const { return error.ok(); }
};

// Identifies one Talk call of a client. 0 only from a Talk() made while the client is being
// destroyed (from a callback), which calls on_error(CANCELLED) at once instead of starting.
using CallId = std::uint64_t;

// The callbacks of one Talk call. All run on the call's worker thread (see the top of this file).
// Any of them may be empty.
struct TalkCallbacks {
  std::function<void(const v1::Started& started)> on_started;
  std::function<void(const std::string& text)> on_delta;
  std::function<void(const v1::Finished& finished)> on_finished;
  std::function<void(const Error& error)> on_error;
  // The reply's emotion, one label of Character::emotions() (e.g. "gruff"): once, before the first
  // on_delta; never for a character without emotions.
  std::function<void(const std::string& label)> on_emotion;
  // One action the NPC takes, after the last on_delta: its name and typed arguments.
  std::function<void(const v1::Action& action)> on_action;
};

// The callbacks of one StartScene call (characters talking among themselves), on the call's worker
// thread like Talk's: on_started once, then on_line for every event of every line in stream order
// (line.index(), line.character_id(), and line.event(): the line's started, emotion, delta, action
// and finished events, as a Talk sends them), then exactly one of on_finished or on_error.
struct SceneCallbacks {
  std::function<void(const v1::SceneStarted& started)> on_started;
  std::function<void(const v1::SceneLine& line)> on_line;
  std::function<void(const v1::SceneFinished& finished)> on_finished;
  std::function<void(const Error& error)> on_error;
};

// Adds `values` to the request's entities list `name` (creating the list, also when `values` is
// empty), e.g. AddEntities(request, "stock", {"iron sword", "steel axe"}): the values an enum
// argument declared `from: stock` may take in this reply. The server checks the limits (at most 16
// lists named [a-z][a-z0-9_]{0,31}, 64 values each of 1-64 characters) and answers INVALID_ARGUMENT.
void AddEntities(v1::TalkRequest& request, const std::string& name, const std::vector<std::string>& values);

// Allows only these actions in this reply (an empty list: none at all). Without a call, every
// action of the character is allowed (request.clear_allowed_actions() goes back to that). A name
// that is not an action of the character makes the call fail with INVALID_ARGUMENT.
void SetAllowedActions(v1::TalkRequest& request, const std::vector<std::string>& names);

// The argument `name` of an action, or nullptr when it has none of that name.
const v1::ActionArgument* FindArgument(const v1::Action& action, const std::string& name);

// The action as one line for logs and debug text: sell_item(item="iron sword", price=40) (strings quoted
// as in JSON, booleans true/false).
std::string FormatAction(const v1::Action& action);

class NpcDialogueClient {
 public:
  // Deadline of every call unless the call is given its own.
  static constexpr std::chrono::milliseconds kDefaultDeadline{60000};
  // Pass as a deadline for a call without deadline (any deadline over a year counts as none).
  static constexpr std::chrono::milliseconds kNoDeadline = std::chrono::milliseconds::max();

  // address: "host:port" of the sidecar (plaintext gRPC; 127.0.0.1:50051 by default).
  // auth_token: sent as "authorization: Bearer <token>" on every call when not empty (the
  //   sidecar's --auth-token / NPC_AUTH_TOKEN).
  // default_deadline: for calls that do not pass their own (kNoDeadline: none).
  // Connecting is lazy: the constructor never blocks or fails; a sidecar that is not running
  // shows as UNAVAILABLE on the first call.
  explicit NpcDialogueClient(std::string address = "127.0.0.1:50051", std::string auth_token = {},
                             std::chrono::milliseconds default_deadline = kDefaultDeadline);

  // Cancels every call still running and waits for their worker threads to end (their on_error
  // callbacks, with CANCELLED, run before the destructor returns).
  ~NpcDialogueClient();

  NpcDialogueClient(const NpcDialogueClient&) = delete;
  NpcDialogueClient& operator=(const NpcDialogueClient&) = delete;

  // Starts one streamed NPC reply and returns at once. deadline: 0 = the client's default.
  // The request is copied. Several calls may run at the same time.
  CallId Talk(const v1::TalkRequest& request, TalkCallbacks callbacks,
              std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  CallId Talk(const v1::TalkRequest& request, std::function<void(const std::string& text)> on_delta,
              std::function<void(const v1::Finished& finished)> on_finished,
              std::function<void(const Error& error)> on_error,
              std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());

  // Starts a scene (see StartScene in dialogue.proto) and returns at once; Cancel(id) stops it within
  // one engine step. A talk to one of its characters in the scene's session (Talk with the same
  // session_id) is the player stepping in. deadline: 0 = none (a scene takes a while).
  CallId StartScene(const v1::SceneRequest& request, SceneCallbacks callbacks,
                    std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());

  // Cancels one call (ClientContext::TryCancel): it ends with on_error(CANCELLED) soon after,
  // unless it had already ended. Returns whether the call was still running. Does not wait.
  bool Cancel(CallId id);
  // Cancels every call still running. Does not wait.
  void Cancel();

  // Waits until the call has ended and its last callback has returned, at most `timeout`.
  // Returns true when it has ended (also for an id that is unknown or long finished).
  bool Wait(CallId id, std::chrono::milliseconds timeout);
  // Calls not ended yet.
  std::size_t ActiveCalls() const;

  // Blocking calls. deadline: 0 = the client's default.
  Result<std::vector<v1::Character>> ListCharacters(
      std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  Result<v1::ServerInfo> GetServerInfo(std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  // The number of turns forgotten.
  Result<int> ResetSession(const std::string& session_id, const std::string& character_id = {},
                           std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  // For a save file: SessionState::SerializeToString / ParseFromString.
  Result<v1::SessionState> ExportSession(const std::string& session_id, const std::string& character_id = {},
                                         std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  Result<v1::ImportSessionResponse> ImportSession(
      const v1::SessionState& state, bool overwrite = true,
      std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  // A character's relationship values with the player of a session (trust, ...), each with its tier.
  Result<std::vector<v1::Relationship>> GetRelationships(
      const std::string& session_id, const std::string& character_id,
      std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  // Sets one value (in its range); the next reply's prompt carries the new tier. Returns every value after.
  Result<std::vector<v1::Relationship>> SetRelationship(
      const std::string& session_id, const std::string& character_id, const std::string& name, std::int64_t value,
      std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());
  // Moves one value by `delta`, clamped to its range.
  Result<std::vector<v1::Relationship>> ChangeRelationship(
      const std::string& session_id, const std::string& character_id, const std::string& name, std::int64_t delta,
      std::chrono::milliseconds deadline = std::chrono::milliseconds::zero());

  const std::string& address() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace npc
