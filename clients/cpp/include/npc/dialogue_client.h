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
//       [](const npc::v1::Finished& done) { /* done.emotion(), done.full_text() */ },
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
// For every call, in this order: on_started (once, optional), on_delta (zero or more times), then
// exactly one of on_finished (the call ended with OK) or on_error (any other status, including
// CANCELLED after Cancel() and DEADLINE_EXCEEDED). Nothing is called after that, and the callbacks
// (with whatever they captured) are destroyed on the worker thread before the call counts as ended.
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
};

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

  const std::string& address() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace npc
