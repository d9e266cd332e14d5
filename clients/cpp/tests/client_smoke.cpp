// client_smoke: checks NpcDialogueClient against a running sidecar (tests/test_cpp_client.py starts
// one). Prints one line per check and exits 0 when every check passed, 1 otherwise.
//
//   client_smoke --address HOST:PORT --character ID [--deadline-ms MS]
//
// MS (default 300000) is the deadline of every call and the longest wait for one: generous, as a
// busy CPU may take long over a reply; the checks of Cancel() and of the destructor have their own,
// short limits.
#include <algorithm>
#include <chrono>
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
  std::vector<std::string> order;  // "started", "delta", "finished", "error"
  std::string text;
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

}  // namespace

int main(int argc, char** argv) {
  std::string address;
  std::string character;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string arg = argv[i];
    if (arg == "--address") address = argv[i + 1];
    if (arg == "--character") character = argv[i + 1];
    if (arg == "--deadline-ms") g_wait = milliseconds(std::atoll(argv[i + 1]));
  }
  if (address.empty() || character.empty()) {
    std::fprintf(stderr, "usage: client_smoke --address HOST:PORT --character ID [--deadline-ms MS]\n");
    return 2;
  }
  const std::string session = "client-smoke";
  npc::NpcDialogueClient client(address, {}, g_wait);

  // --- blocking calls ---
  auto characters = client.ListCharacters();
  Check(characters.ok(), "ListCharacters", Describe(characters.error));
  Check(std::any_of(characters.value.begin(), characters.value.end(),
                    [&](const npc::v1::Character& c) { return c.id() == character && c.serving(); }),
        "ListCharacters has " + character + ", serving");
  auto info = client.GetServerInfo();
  Check(info.ok() && !info.value.version().empty(), "GetServerInfo", Describe(info.error));
  const int long_reply = std::max(1, std::min(400, info.value.max_tokens_limit()));

  // --- a whole streamed reply ---
  {
    Probe probe;
    const auto id = client.Talk(Request(character, "Hello, who are you?", 8, session), probe.Callbacks());
    Check(id != 0, "Talk returns a call id");
    Check(client.Wait(id, g_wait), "Talk ends");
    std::lock_guard<std::mutex> lock(probe.mu);
    Check(probe.error.ok(), "Talk succeeds", Describe(probe.error));
    Check(!probe.order.empty() && probe.order.front() == "started" && probe.order.back() == "finished" &&
              std::count(probe.order.begin(), probe.order.end(), "started") == 1,
          "callbacks in order: started, deltas, finished");
    Check(probe.terminal_callbacks == 1, "exactly one of on_finished/on_error");
    Check(!probe.callbacks_on_main_thread, "callbacks run on a worker thread");
    Check(!probe.text.empty(), "reply streamed text", probe.text);
    Check(probe.text == probe.finished.full_text(), "streamed text == Finished.full_text",
          "'" + probe.text + "' vs '" + probe.finished.full_text() + "'");
    Check(probe.finished.reason() == npc::v1::FINISH_REASON_LENGTH ||
              probe.finished.reason() == npc::v1::FINISH_REASON_STOP,
          "finish reason STOP or LENGTH");
    Check(probe.finished.usage().completion_tokens() <= 8, "max_tokens respected");

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
