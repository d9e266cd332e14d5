// client_smoke: checks NpcDialogueClient against a running sidecar (tests/test_cpp_client.py starts
// one). Prints one line per check and exits 0 when every check passed, 1 otherwise.
//
//   client_smoke --address HOST:PORT --character ID [--deadline-ms MS] [--only-actions]
//
// MS (default 300000) is the deadline of every call and the longest wait for one: generous, as a
// busy CPU may take long over a reply; the checks of Cancel() and of the destructor have their own,
// short limits. --only-actions runs only the checks of actions and entities (for a character that
// declares actions) instead of the whole list.
//
// Every finished reply is checked against what the character declares (ListCharacters): the
// callback order started, [emotion], delta..., [action...], finished; one emotion from
// Character::emotions() when it declares any (none otherwise), equal to Finished::emotion(); the
// actions equal to Finished::actions(), each one of the character's, allowed by the request, with
// every argument of its declared type and bounds (enum values from the spec or the request's
// entities).
#include <algorithm>
#include <chrono>
#include <map>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "npc/dialogue_client.h"

namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// The same lines again and again, so the sidecar's prefix cache spares most of each prompt.
constexpr const char* kLongLine = "Tell me a long story about the stars, the river and the smoke.";

int g_failures = 0;
const Clock::time_point g_start = Clock::now();
milliseconds g_wait{300000};

void Check(bool ok, const std::string& what, const std::string& detail = {}) {
  const double at = std::chrono::duration<double>(Clock::now() - g_start).count();
  std::printf("%s: %s%s%s  [%.1f s]\n", ok ? "ok" : "FAIL", what.c_str(), detail.empty() ? "" : " -- ",
              detail.c_str(), at);
  std::fflush(stdout);
  if (!ok) ++g_failures;
}

double MsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

std::string Describe(const npc::Error& error) {
  if (error.ok()) return "OK";
  return std::string(npc::StatusCodeName(error.code)) + ": " + error.message;
}

// Records what the callbacks of one call saw; the main thread waits on it.
struct Probe {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::string> order;  // "started", "emotion", "delta", "action", "finished", "error"
  std::string text;
  std::vector<std::string> emotions;
  std::vector<npc::v1::Action> actions;
  npc::v1::Finished finished;
  npc::Error error;
  bool ended = false;
  int terminal_callbacks = 0;
  bool callbacks_on_main_thread = false;
  std::thread::id main_thread = std::this_thread::get_id();
  Clock::time_point ended_at;

  void Note(const char* what) {
    order.push_back(what);
    if (std::this_thread::get_id() == main_thread) callbacks_on_main_thread = true;
  }

  npc::TalkCallbacks Callbacks() {
    npc::TalkCallbacks callbacks;
    callbacks.on_started = [this](const npc::v1::Started&) {
      std::lock_guard<std::mutex> lock(mu);
      Note("started");
      cv.notify_all();
    };
    callbacks.on_delta = [this](const std::string& piece) {
      std::lock_guard<std::mutex> lock(mu);
      Note("delta");
      text += piece;
      cv.notify_all();
    };
    callbacks.on_emotion = [this](const std::string& label) {
      std::lock_guard<std::mutex> lock(mu);
      Note("emotion");
      emotions.push_back(label);
    };
    callbacks.on_action = [this](const npc::v1::Action& action) {
      std::lock_guard<std::mutex> lock(mu);
      Note("action");
      actions.push_back(action);
    };
    callbacks.on_finished = [this](const npc::v1::Finished& done) {
      std::lock_guard<std::mutex> lock(mu);
      Note("finished");
      finished = done;
      End();
    };
    callbacks.on_error = [this](const npc::Error& failure) {
      std::lock_guard<std::mutex> lock(mu);
      Note("error");
      error = failure;
      End();
    };
    return callbacks;
  }

  void End() {
    ended = true;
    ++terminal_callbacks;
    ended_at = Clock::now();
    cv.notify_all();
  }

  // Waits for the first delta (or the end); true when a delta came.
  bool WaitFirstDelta(milliseconds timeout) {
    std::unique_lock<std::mutex> lock(mu);
    cv.wait_for(lock, timeout, [this] { return !text.empty() || ended; });
    return !text.empty();
  }
};

npc::v1::TalkRequest Request(const std::string& character, const std::string& line, int max_tokens,
                             const std::string& session = {}) {
  npc::v1::TalkRequest request;
  request.set_character_id(character);
  request.set_player_line(line);
  request.set_session_id(session);
  request.mutable_options()->set_max_tokens(max_tokens);
  return request;
}

std::string Joined(const std::vector<std::string>& items) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : ",") + item;
  return out;
}

// Empty when `order` is started, [emotion], delta..., action..., finished: the order dialogue.proto
// promises for a reply that ends with OK. Otherwise what is wrong.
std::string OrderProblem(const std::vector<std::string>& order) {
  static const char* kStages[] = {"started", "emotion", "delta", "action", "finished"};
  int stage = -1;
  for (const auto& what : order) {
    int at = -1;
    for (int i = 0; i < 5; ++i) {
      if (what == kStages[i]) at = i;
    }
    const bool repeats = at == stage && (what == "delta" || what == "action");
    if (at < 0 || (at <= stage && !repeats)) return "order " + Joined(order);
    stage = at;
  }
  if (order.empty() || order.front() != "started" || order.back() != "finished") return "order " + Joined(order);
  return {};
}

std::size_t Utf8Chars(const std::string& text) {
  std::size_t chars = 0;
  for (const char c : text) chars += (static_cast<unsigned char>(c) & 0xC0) != 0x80 ? 1 : 0;
  return chars;
}

bool Contains(const google::protobuf::RepeatedPtrField<std::string>& items, const std::string& item) {
  return std::find(items.begin(), items.end(), item) != items.end();
}

// Empty when `action` is one the character declares and the request allows, with every argument of
// its type, within its bounds, an enum value from the spec or from the request's entities.
std::string ActionProblem(const npc::v1::Action& action, const npc::v1::Character& character,
                          const npc::v1::TalkRequest& request) {
  const std::string what = npc::FormatAction(action) + ": ";
  const npc::v1::ActionSpec* spec = nullptr;
  for (const auto& candidate : character.actions()) {
    if (candidate.name() == action.name()) spec = &candidate;
  }
  if (spec == nullptr) return what + "not an action of " + character.id();
  if (request.has_allowed_actions() && !Contains(request.allowed_actions().names(), action.name())) {
    return what + "not in allowed_actions";
  }
  if (action.arguments_size() != spec->arguments_size()) return what + "arguments differ from the spec's";
  for (int i = 0; i < spec->arguments_size(); ++i) {
    const npc::v1::ArgumentSpec& arg_spec = spec->arguments(i);
    const npc::v1::ActionArgument& argument = action.arguments(i);
    const std::string where = what + arg_spec.name() + ": ";
    if (argument.name() != arg_spec.name()) return where + "argument " + std::to_string(i) + " is " + argument.name();
    if (arg_spec.type() == "enum") {
      if (argument.value_case() != npc::v1::ActionArgument::kStringValue) return where + "not a string_value";
      if (!arg_spec.values_from().empty()) {
        auto list = request.entities().find(arg_spec.values_from());
        if (list == request.entities().end() || !Contains(list->second.values(), argument.string_value())) {
          return where + "not in the request's entities[" + arg_spec.values_from() + "]";
        }
      } else if (!Contains(arg_spec.values(), argument.string_value())) {
        return where + "not one of the spec's values";
      }
    } else if (arg_spec.type() == "integer") {
      if (argument.value_case() != npc::v1::ActionArgument::kIntValue) return where + "not an int_value";
      if (argument.int_value() < arg_spec.min_value() || argument.int_value() > arg_spec.max_value()) {
        return where + "out of bounds";
      }
    } else if (arg_spec.type() == "string") {
      if (argument.value_case() != npc::v1::ActionArgument::kStringValue) return where + "not a string_value";
      if (Utf8Chars(argument.string_value()) > static_cast<std::size_t>(arg_spec.max_chars())) {
        return where + "longer than max_chars";
      }
    } else if (arg_spec.type() == "boolean") {
      if (argument.value_case() != npc::v1::ActionArgument::kBoolValue) return where + "not a bool_value";
    } else {
      return where + "unknown type " + arg_spec.type();
    }
  }
  const std::string& json = action.arguments_json();
  if (json.size() < 2 || json.front() != '{' || json.back() != '}') return what + "arguments_json " + json;
  std::size_t at = 0;
  for (const auto& argument : action.arguments()) {
    at = json.find("\"" + argument.name() + "\": ", at);
    if (at == std::string::npos) return what + "arguments_json lacks " + argument.name() + " (in order): " + json;
  }
  return {};
}

// Empty when a reply that ended with OK has the events and values dialogue.proto promises for this
// character and request (see the top of this file). Call with probe.mu held.
std::string ReplyProblem(const Probe& probe, const npc::v1::Character& character,
                         const npc::v1::TalkRequest& request) {
  std::string problem = OrderProblem(probe.order);
  if (!problem.empty()) return problem;
  const npc::v1::Finished& finished = probe.finished;
  if (character.emotions_size() > 0) {
    if (probe.emotions.size() != 1) return "expected one emotion, got " + std::to_string(probe.emotions.size());
    if (!Contains(character.emotions(), probe.emotions[0])) return "emotion '" + probe.emotions[0] + "' not declared";
    if (finished.emotion() != probe.emotions[0]) return "Finished.emotion '" + finished.emotion() + "' != event";
  } else if (!probe.emotions.empty() || !finished.emotion().empty()) {
    return "an emotion from a character without emotions";
  }
  if (probe.actions.size() != static_cast<std::size_t>(finished.actions_size())) {
    return "Finished.actions has " + std::to_string(finished.actions_size()) + " actions, the events " +
           std::to_string(probe.actions.size());
  }
  if (probe.actions.size() > 3) return "more than 3 actions";
  for (std::size_t i = 0; i < probe.actions.size(); ++i) {
    if (probe.actions[i].SerializeAsString() != finished.actions(static_cast<int>(i)).SerializeAsString()) {
      return "Finished.actions[" + std::to_string(i) + "] differs from the action event";
    }
    problem = ActionProblem(probe.actions[i], character, request);
    if (!problem.empty()) return problem;
  }
  return {};
}

std::string Describe(const std::vector<npc::v1::Action>& actions) {
  std::vector<std::string> shown;
  for (const auto& action : actions) shown.push_back(npc::FormatAction(action));
  return shown.empty() ? "no action" : Joined(shown);
}

// True when the sidecar reports no reply running or waiting within `timeout`.
bool ServerIdle(npc::NpcDialogueClient& client, milliseconds timeout, std::string* last) {
  const auto start = Clock::now();
  while (true) {
    auto info = client.GetServerInfo(milliseconds(2000));
    if (info.ok()) {
      *last = "active_sequences=" + std::to_string(info.value.active_sequences()) +
              " waiting_requests=" + std::to_string(info.value.waiting_requests());
      if (info.value.active_sequences() == 0 && info.value.waiting_requests() == 0) return true;
    } else {
      *last = Describe(info.error);
    }
    if (Clock::now() - start > timeout) return false;
    std::this_thread::sleep_for(milliseconds(50));
  }
}

// The checks of --only-actions, for a character that declares actions. Returns the failures.
int CheckActions(npc::NpcDialogueClient& client, const npc::v1::Character& declared,
                 const npc::v1::ServerInfo& info) {
  const std::string& character = declared.id();
  const int before = g_failures;
  Check(declared.actions_size() > 0, "the character declares actions (Character.actions)",
        std::to_string(declared.actions_size()));
  std::vector<std::string> lists;  // the entities lists its enum arguments take values from
  for (const auto& action : declared.actions()) {
    Check(!action.name().empty() && !action.description().empty(), "ActionSpec " + action.name() +
          ": name and description");
    for (const auto& argument : action.arguments()) {
      if (!argument.values_from().empty() &&
          std::find(lists.begin(), lists.end(), argument.values_from()) == lists.end()) {
        lists.push_back(argument.values_from());
      }
    }
  }
  const auto& limits = info.limits();
  Check(limits.max_entity_lists() == 16 && limits.max_entity_values() == 64 && limits.max_entity_chars() == 64,
        "ServerInfo.limits: entity limits 16/64/64",
        std::to_string(limits.max_entity_lists()) + "/" + std::to_string(limits.max_entity_values()) + "/" +
            std::to_string(limits.max_entity_chars()));

  // Replies with every action allowed, the lists given: whatever actions come must be valid.
  const char* lines[] = {"I'll take the iron sword. Here is your gold.", "Sell me your best blade, smith.",
                         "What do you have for sale? I want to buy something now."};
  int replies = 0;
  std::vector<npc::v1::Action> seen;
  for (const char* line : lines) {
    auto request = Request(character, line, 60);
    for (const auto& list : lists) npc::AddEntities(request, list, {"iron sword", "steel axe", "hammer"});
    Probe probe;
    const auto id = client.Talk(request, probe.Callbacks());
    client.Wait(id, g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.ok(), std::string("Talk with entities: ") + line, Describe(probe.error));
    if (!probe.error.ok()) continue;
    ++replies;
    const std::string problem = ReplyProblem(probe, declared, request);
    Check(problem.empty(), "reply's emotion and actions valid", problem + " [" + Describe(probe.actions) + "]");
    seen.insert(seen.end(), probe.actions.begin(), probe.actions.end());
  }
  std::printf("note: %d action(s) in %d replies: %s\n", static_cast<int>(seen.size()), replies,
              Describe(seen).c_str());

  // Only one action allowed; then none at all.
  {
    auto request = Request(character, lines[0], 60);
    for (const auto& list : lists) npc::AddEntities(request, list, {"iron sword"});
    npc::SetAllowedActions(request, {declared.actions(0).name()});
    Probe probe;
    client.Wait(client.Talk(request, probe.Callbacks()), g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    const std::string problem = probe.error.ok() ? ReplyProblem(probe, declared, request) : Describe(probe.error);
    Check(problem.empty(), "allowed_actions with one name: only that action", problem);
  }
  {
    auto request = Request(character, lines[0], 60);
    for (const auto& list : lists) npc::AddEntities(request, list, {"iron sword"});
    npc::SetAllowedActions(request, {});
    Probe probe;
    client.Wait(client.Talk(request, probe.Callbacks()), g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    const std::string problem = probe.error.ok() ? ReplyProblem(probe, declared, request) : Describe(probe.error);
    Check(problem.empty() && probe.actions.empty() && probe.finished.actions_size() == 0,
          "allowed_actions set but empty: no action", problem + " [" + Describe(probe.actions) + "]");
  }

  // Input errors, before started.
  struct Bad {
    const char* what;
    void (*edit)(npc::v1::TalkRequest&);
  };
  const Bad bad[] = {
      {"allowed_actions: an action the character lacks",
       [](npc::v1::TalkRequest& r) { npc::SetAllowedActions(r, {"no_such_action"}); }},
      {"entities: a malformed list name", [](npc::v1::TalkRequest& r) { npc::AddEntities(r, "Bad-Name", {"x"}); }},
      {"entities: a value with a line break",
       [](npc::v1::TalkRequest& r) { npc::AddEntities(r, "stock", {"iron\nsword"}); }},
      {"entities: a value of 65 characters",
       [](npc::v1::TalkRequest& r) { npc::AddEntities(r, "stock", {std::string(65, 'a')}); }},
      {"entities: an empty value", [](npc::v1::TalkRequest& r) { npc::AddEntities(r, "stock", {""}); }},
      {"entities: a control-token string",
       [](npc::v1::TalkRequest& r) { npc::AddEntities(r, "stock", {"sword<|im_end|>"}); }},
      {"entities: 17 lists",
       [](npc::v1::TalkRequest& r) {
         for (int i = 0; i < 17; ++i) npc::AddEntities(r, "list" + std::to_string(i), {"x"});
       }},
      {"entities: 65 values in a list",
       [](npc::v1::TalkRequest& r) {
         for (int i = 0; i < 65; ++i) npc::AddEntities(r, "stock", {"item " + std::to_string(i)});
       }},
  };
  for (const auto& b : bad) {
    auto request = Request(character, "Hello", 4);
    b.edit(request);
    Probe probe;
    client.Wait(client.Talk(request, probe.Callbacks()), g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.code == grpc::StatusCode::INVALID_ARGUMENT && !probe.error.message.empty() &&
              probe.order.size() == 1,
          std::string(b.what) + ": INVALID_ARGUMENT before started", Describe(probe.error));
  }
  return g_failures - before;
}

}  // namespace

int main(int argc, char** argv) {
  std::string address;
  std::string character;
  bool only_actions = false;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--only-actions") {
      only_actions = true;
      continue;
    }
    if (i + 1 >= argc) break;
    if (arg == "--address") address = argv[i + 1];
    if (arg == "--character") character = argv[i + 1];
    if (arg == "--deadline-ms") g_wait = milliseconds(std::atoll(argv[i + 1]));
    ++i;
  }
  if (address.empty() || character.empty()) {
    std::fprintf(stderr,
                 "usage: client_smoke --address HOST:PORT --character ID [--deadline-ms MS] [--only-actions]\n");
    return 2;
  }
  const std::string session = "client-smoke";
  npc::NpcDialogueClient client(address, {}, g_wait);

  // --- blocking calls ---
  auto characters = client.ListCharacters();
  Check(characters.ok(), "ListCharacters", Describe(characters.error));
  npc::v1::Character declared;  // what the character declares: emotions, actions
  for (const auto& c : characters.value) {
    if (c.id() == character) declared = c;
  }
  Check(declared.id() == character && declared.serving(), "ListCharacters has " + character + ", serving");
  const std::vector<std::string> emotions(declared.emotions().begin(), declared.emotions().end());
  std::printf("note: %s declares emotions [%s] and %d action(s)\n", character.c_str(), Joined(emotions).c_str(),
              declared.actions_size());
  auto info = client.GetServerInfo();
  Check(info.ok() && !info.value.version().empty(), "GetServerInfo", Describe(info.error));
  const int long_reply = std::max(1, std::min(400, info.value.max_tokens_limit()));

  if (only_actions) {
    const int failures = CheckActions(client, declared, info.value);
    std::printf("%s: %d failure(s)\n", g_failures == 0 ? "passed" : "FAILED", g_failures);
    return failures == 0 ? 0 : 1;
  }

  // --- a whole streamed reply ---
  {
    Probe probe;
    const auto id = client.Talk(Request(character, "Hello, who are you?", 8, session), probe.Callbacks());
    Check(id != 0, "Talk returns a call id");
    Check(client.Wait(id, g_wait), "Talk ends");
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.ok(), "Talk succeeds", Describe(probe.error));
    Check(OrderProblem(probe.order).empty(), "callbacks in order: started, [emotion], deltas, [actions], finished",
          Joined(probe.order));
    if (declared.emotions_size() > 0) {
      Check(probe.emotions.size() == 1 && probe.order.size() > 1 && probe.order[1] == "emotion",
            "on_emotion once, right after on_started (the character declares emotions)",
            std::to_string(probe.emotions.size()) + " emotion(s): " + Joined(probe.emotions));
    }
    const std::string problem = ReplyProblem(probe, declared, Request(character, "Hello, who are you?", 8, session));
    Check(problem.empty(), "emotion and actions as the character declares, repeated in Finished", problem);
    Check(probe.terminal_callbacks == 1, "exactly one of on_finished/on_error");
    Check(!probe.callbacks_on_main_thread, "callbacks run on a worker thread");
    Check(!probe.text.empty(), "reply streamed text", probe.text);
    Check(probe.text == probe.finished.full_text(), "streamed text == Finished.full_text",
          "'" + probe.text + "' vs '" + probe.finished.full_text() + "'");
    Check(probe.finished.reason() == npc::v1::FINISH_REASON_LENGTH ||
              probe.finished.reason() == npc::v1::FINISH_REASON_STOP,
          "finish reason STOP or LENGTH");
    if (declared.emotions_size() == 0 && declared.actions_size() == 0) {
      Check(probe.finished.usage().completion_tokens() <= 8, "max_tokens respected");
    } else {  // max_tokens bounds the spoken text; the emotion and the actions have room of their own
      Check(std::count(probe.order.begin(), probe.order.end(), "delta") <= 8, "max_tokens respected: at most 8 deltas",
            std::to_string(probe.finished.usage().completion_tokens()) + " completion tokens in all");
    }

    // --- sessions: export (as a save file would keep it), reset, import ---
    auto state = client.ExportSession(session);
    Check(state.ok() && state.value.turns_size() == 1 && state.value.turns(0).npc_line() == probe.text,
          "ExportSession holds the turn", Describe(state.error));
    std::string bytes;
    npc::v1::SessionState restored;
    Check(state.value.SerializeToString(&bytes) && restored.ParseFromString(bytes), "SessionState round trip");
    auto forgotten = client.ResetSession(session);
    Check(forgotten.ok() && forgotten.value == 1, "ResetSession forgets 1 turn", Describe(forgotten.error));
    auto missing = client.ExportSession(session);
    Check(missing.error.code == grpc::StatusCode::NOT_FOUND, "ExportSession after reset: NOT_FOUND",
          Describe(missing.error));
    auto imported = client.ImportSession(restored, false);
    Check(imported.ok() && imported.value.turns() == 1, "ImportSession restores it", Describe(imported.error));
    auto again = client.ImportSession(restored, false);
    Check(again.error.code == grpc::StatusCode::ALREADY_EXISTS, "ImportSession without overwrite: ALREADY_EXISTS",
          Describe(again.error));

    // --- relationships (the character's first one, if it declares any) ---
    auto values = client.GetRelationships(session, character);
    Check(values.ok(), "GetRelationships", Describe(values.error));
    if (!values.value.empty()) {
      const npc::v1::Relationship first = values.value[0];
      auto set = client.SetRelationship(session, character, first.name(), first.max_value());
      Check(set.ok() && set.value[0].value() == first.max_value() && !set.value[0].tier().empty(),
            "SetRelationship to the top of the range, with its tier", Describe(set.error));
      auto moved = client.ChangeRelationship(session, character, first.name(), -1);
      Check(moved.ok() && moved.value[0].value() == first.max_value() - 1, "ChangeRelationship by -1",
            Describe(moved.error));
      auto saved = client.ExportSession(session);
      Check(saved.ok() && saved.value.relationships_size() == 1 &&
                saved.value.relationships(0).value() == first.max_value() - 1,
            "ExportSession keeps the relationship value", Describe(saved.error));
      auto out_of_range = client.SetRelationship(session, character, first.name(), first.max_value() + 1);
      Check(out_of_range.error.code == grpc::StatusCode::INVALID_ARGUMENT && !out_of_range.error.message.empty(),
            "a value out of range: INVALID_ARGUMENT with a message", Describe(out_of_range.error));
    }
    client.ResetSession(session);
  }

  // --- a scene: the character and another one talk among themselves, two lines ---
  std::string other;
  for (const auto& c : characters.value) {
    if (c.id() != character && c.serving() && other.empty()) other = c.id();
  }
  if (!other.empty()) {
    npc::v1::SceneRequest request;
    request.add_character_ids(character);
    request.add_character_ids(other);
    request.set_situation("Two old acquaintances meet on the road at dusk.");
    request.set_session_id(session);
    request.set_max_lines(2);
    request.mutable_options()->set_max_tokens(6);
    request.mutable_options()->set_temperature(0.0f);
    std::mutex mu;
    std::vector<std::string> seen;  // "started", "<index>:<speaker>:<event>", "finished:<lines>", "error"
    npc::v1::SceneStarted started;
    npc::SceneCallbacks callbacks;
    callbacks.on_started = [&](const npc::v1::SceneStarted& s) {
      std::lock_guard<std::mutex> lock(mu);
      started = s;
      seen.push_back("started");
    };
    callbacks.on_line = [&](const npc::v1::SceneLine& line) {
      std::lock_guard<std::mutex> lock(mu);
      const char* kind = line.event().has_started() ? "started" : line.event().has_finished() ? "finished" : "other";
      seen.push_back(std::to_string(line.index()) + ":" + line.character_id() + ":" + kind);
    };
    callbacks.on_finished = [&](const npc::v1::SceneFinished& f) {
      std::lock_guard<std::mutex> lock(mu);
      seen.push_back("finished:" + std::to_string(f.lines()));
    };
    callbacks.on_error = [&](const npc::Error& e) {
      std::lock_guard<std::mutex> lock(mu);
      seen.push_back("error " + Describe(e));
    };
    const auto id = client.StartScene(request, std::move(callbacks));
    Check(client.Wait(id, g_wait), "StartScene ends");
    std::lock_guard<std::mutex> lock(mu);
    const std::vector<std::string> expected_edges = {"started", "0:" + character + ":started",
                                                     "1:" + other + ":finished", "finished:2"};
    const bool ordered = seen.size() >= 6 && seen[0] == expected_edges[0] && seen[1] == expected_edges[1] &&
                         seen[seen.size() - 2] == expected_edges[2] && seen.back() == expected_edges[3];
    Check(ordered && started.names_size() == 2, "StartScene: started, line 0 by " + character + ", line 1 by " +
          other + ", finished with 2 lines", Joined(seen));
    auto saved = client.ExportSession(session);
    Check(saved.ok() && saved.value.scenes_size() == 1 && saved.value.turns_size() == 2 &&
              saved.value.turns(1).scene_id() == started.scene_id(),
          "ExportSession has the scene and its 2 lines", Describe(saved.error));
    client.ResetSession(session);
  }

  // --- errors surface as code + message ---
  {
    Probe probe;
    const auto id = client.Talk(Request("no-such-npc", "Hi", 4), probe.Callbacks());
    client.Wait(id, g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.code == grpc::StatusCode::NOT_FOUND && !probe.error.message.empty(),
          "unknown character: NOT_FOUND with a message", Describe(probe.error));
    Check(probe.order.size() == 1, "an input error comes before started");
  }
  {
    Probe probe;
    const auto id = client.Talk(Request(character, kLongLine, long_reply), probe.Callbacks(),
                                milliseconds(1));
    client.Wait(id, g_wait);
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.code == grpc::StatusCode::DEADLINE_EXCEEDED, "1 ms deadline: DEADLINE_EXCEEDED",
          Describe(probe.error));
  }

  // --- Cancel() from another thread after the first delta ---
  // A reply may end on its own before the cancel lands (the model said all it had to say): try again.
  bool cancelled = false;
  for (int attempt = 0; attempt < 4 && !cancelled; ++attempt) {
    Probe probe;
    const char* lines[] = {kLongLine, "Describe every vision you ever had, one by one.",
                           "What do the stars say about me?", "Speak of the dragon, the king and the silver key."};
    const auto id = client.Talk(Request(character, lines[attempt], long_reply), probe.Callbacks());
    const bool streaming = probe.WaitFirstDelta(g_wait);
    const auto cancel_at = Clock::now();
    const bool was_running = client.Cancel(id);
    const bool ended = client.Wait(id, milliseconds(5000));
    std::lock_guard<std::mutex> lock(probe.mu);
    if (!streaming || !was_running || probe.error.ok()) {
      std::printf("note: attempt %d ended before the cancel (%s)\n", attempt + 1, probe.error.ok() ? "finished"
                                                                                                  : "error");
      if (!probe.error.ok() && probe.error.code != grpc::StatusCode::CANCELLED) {
        Check(false, "cancel attempt", Describe(probe.error));
        break;
      }
      continue;
    }
    cancelled = true;
    Check(ended, "cancelled call ends within 5 s", std::to_string(MsSince(cancel_at)) + " ms");
    Check(probe.error.code == grpc::StatusCode::CANCELLED, "Cancel(): on_error(CANCELLED)", Describe(probe.error));
    Check(probe.terminal_callbacks == 1 && probe.order.back() == "error", "no on_finished after Cancel()");
    Check(std::chrono::duration<double, std::milli>(probe.ended_at - cancel_at).count() < 5000,
          "on_error within 5 s of Cancel()");
  }
  Check(cancelled, "a reply was cancelled mid-stream");
  std::string last;
  Check(ServerIdle(client, milliseconds(20000), &last), "sidecar active_sequences back to 0 after cancel", last);

  // --- Cancel() from inside a callback (the worker thread) ---
  {
    Probe probe;
    npc::NpcDialogueClient* self = &client;
    npc::CallId id = 0;
    std::mutex id_mu;
    auto callbacks = probe.Callbacks();
    auto record = callbacks.on_delta;
    callbacks.on_delta = [&, self, record](const std::string& piece) {
      record(piece);
      std::lock_guard<std::mutex> lock(id_mu);
      self->Cancel(id);
    };
    {
      std::lock_guard<std::mutex> lock(id_mu);
      id = client.Talk(Request(character, kLongLine, long_reply), callbacks);
    }
    Check(client.Wait(id, g_wait), "call cancelled from its callback ends");
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.code == grpc::StatusCode::CANCELLED || probe.error.ok(),
          "Cancel() from on_delta: CANCELLED (or already finished)", Describe(probe.error));
  }

  // --- two calls at once ---
  {
    Probe a, b;
    const auto ia = client.Talk(Request(character, "Hello, who are you?", 4), a.Callbacks());
    const auto ib = client.Talk(Request(character, "Hello, who are you?", 4), b.Callbacks());
    Check(ia != ib, "distinct call ids");
    const bool both = client.Wait(ia, g_wait) && client.Wait(ib, g_wait);
    std::lock_guard<std::mutex> la(a.mu);
    std::lock_guard<std::mutex> lb(b.mu);
    Check(both && a.error.ok() && b.error.ok() && a.text == a.finished.full_text() &&
              b.text == b.finished.full_text(),
          "two concurrent Talk calls", Describe(a.error) + " / " + Describe(b.error));
    const auto request = Request(character, "Hello, who are you?", 4);
    const std::string problem = ReplyProblem(a, declared, request) + ReplyProblem(b, declared, request);
    Check(problem.empty(), "two concurrent calls: each its own emotion and actions", problem);
  }

  // --- the destructor cancels and joins ---
  {
    Probe probe;
    auto scoped = std::make_unique<npc::NpcDialogueClient>(address, std::string(), g_wait);
    scoped->Talk(Request(character, kLongLine, long_reply), probe.Callbacks());
    probe.WaitFirstDelta(g_wait);
    const auto start = Clock::now();
    scoped.reset();
    const double took = MsSince(start);
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.ended, "destructor waited for the call's last callback");
    Check(probe.error.code == grpc::StatusCode::CANCELLED || probe.error.ok(),
          "destructor cancels the call in flight", Describe(probe.error));
    Check(took < 5000, "destructor returns within 5 s", std::to_string(took) + " ms");
  }

  // --- the client destroyed from inside one of its callbacks (documented as not to do; it must not
  // deadlock or crash: the destructor detaches that worker, which then ends with CANCELLED) ---
  {
    Probe probe;
    std::mutex owner_mu;
    npc::NpcDialogueClient* owned = new npc::NpcDialogueClient(address, std::string(), g_wait);
    auto callbacks = probe.Callbacks();
    auto record = callbacks.on_delta;
    callbacks.on_delta = [&owner_mu, &owned, record](const std::string& piece) {
      record(piece);
      std::lock_guard<std::mutex> lock(owner_mu);
      delete owned;
      owned = nullptr;
    };
    {
      std::lock_guard<std::mutex> lock(owner_mu);
      owned->Talk(Request(character, kLongLine, long_reply), std::move(callbacks));
    }
    std::unique_lock<std::mutex> lock(probe.mu);
    const bool ended = probe.cv.wait_for(lock, g_wait, [&probe] { return probe.ended; });
    const npc::Error error = probe.error;
    lock.unlock();
    std::lock_guard<std::mutex> owner_lock(owner_mu);
    const bool destroyed = owned == nullptr;  // false only for a reply without any text
    Check(ended && (destroyed ? error.code == grpc::StatusCode::CANCELLED : error.ok()),
          "client destroyed from its own callback: the call ends with CANCELLED", Describe(error));
    delete owned;
    std::this_thread::sleep_for(milliseconds(200));  // let the detached worker finish returning
  }
  Check(ServerIdle(client, milliseconds(20000), &last), "sidecar idle after the destructor", last);

  // --- bookkeeping and an unreachable server ---
  Check(!client.Cancel(987654), "Cancel(unknown id) is false");
  Check(client.Wait(987654, milliseconds(0)), "Wait(unknown id) is true");
  Check(client.ActiveCalls() == 0, "no call left running");
  {
    npc::NpcDialogueClient nowhere("127.0.0.1:9", {}, milliseconds(5000));
    auto none = nowhere.ListCharacters();
    Check(none.error.code == grpc::StatusCode::UNAVAILABLE, "nothing listening: UNAVAILABLE", Describe(none.error));
  }

  std::printf("%s: %d failure(s)\n", g_failures == 0 ? "passed" : "FAILED", g_failures);
  return g_failures == 0 ? 0 : 1;
}
