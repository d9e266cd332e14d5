// npc_talk: one player line to one NPC of a running sidecar, the reply printed as it streams.
//
//   npc_talk --address 127.0.0.1:50051 --character blacksmith [--session S] [--max-tokens N]
//            [--temperature T] [--seed N] [--player-name NAME] [--deadline-ms MS] [--token T]
//            [--entity LIST=VALUE]... [--allow-action NAME]... [--no-actions] "line"
//   npc_talk --address 127.0.0.1:50051 --list     (id, name, status, adapter, actions, error)
//   npc_talk --address 127.0.0.1:50051 --info
//
// The reply goes to stdout: its emotion in brackets first (when the character declares emotions),
// then the text, each piece flushed as it arrives, then a newline, then one line per action:
//
//   [gruff] Forty gold, lad, and it's yours.
//   -> sell_item(item="iron sword", price=40)
//
// A summary line (finish reason, emotion, actions, timings, tokens) goes to stderr. --entity adds
// one value to a list of TalkRequest.entities (repeat it: --entity stock="iron sword" --entity
// stock=hammer); --allow-action allows only the actions named (repeat it); --no-actions allows none.
// Exit status: 0 on success; 1 when the call fails, with "error: <STATUS_CODE>: <message>" on
// stderr; 2 on a usage error; 130 when interrupted (Ctrl-C cancels the call).
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "npc/dialogue_client.h"

namespace {

std::atomic<bool> g_interrupted{false};

extern "C" void OnSignal(int) { g_interrupted.store(true); }

const char* kUsage =
    "usage: npc_talk [--address HOST:PORT] --character ID [--session S] [--max-tokens N]\n"
    "                [--temperature T] [--seed N] [--player-name NAME] [--deadline-ms MS] [--token T]\n"
    "                [--entity LIST=VALUE]... [--allow-action NAME]... [--no-actions] LINE\n"
    "       npc_talk [--address HOST:PORT] [--token T] --list | --info\n";

int Usage(const std::string& problem) {
  if (!problem.empty()) std::fprintf(stderr, "npc_talk: %s\n", problem.c_str());
  std::fputs(kUsage, stderr);
  return 2;
}

int Fail(const npc::Error& error) {
  std::fprintf(stderr, "error: %s: %s\n", npc::StatusCodeName(error.code), error.message.c_str());
  return 1;
}

bool ParseLong(const std::string& text, long long* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  *out = std::strtoll(text.c_str(), &end, 10);
  return end != nullptr && *end == '\0';
}

bool ParseDouble(const std::string& text, double* out) {
  if (text.empty()) return false;
  char* end = nullptr;
  *out = std::strtod(text.c_str(), &end);
  return end != nullptr && *end == '\0';
}

const char* FinishReasonName(npc::v1::FinishReason reason) {
  switch (reason) {
    case npc::v1::FINISH_REASON_STOP: return "STOP";
    case npc::v1::FINISH_REASON_LENGTH: return "LENGTH";
    case npc::v1::FINISH_REASON_CANCELLED: return "CANCELLED";
    default: return "UNSPECIFIED";
  }
}

const char* CharacterStatusName(npc::v1::CharacterStatus status) {
  switch (status) {
    case npc::v1::CHARACTER_STATUS_READY: return "ready";
    case npc::v1::CHARACTER_STATUS_FAILED: return "failed";
    default: return "unspecified";
  }
}

}  // namespace

int main(int argc, char** argv) {
  std::string address = "127.0.0.1:50051";
  std::string token;
  std::string character;
  std::string session;
  std::string player_name;
  long long max_tokens = 0;
  long long deadline_ms = 0;
  bool has_temperature = false;
  double temperature = 0.0;
  bool has_seed = false;
  long long seed = 0;
  bool list = false;
  bool info = false;
  std::map<std::string, std::vector<std::string>> entities;
  bool restrict_actions = false;
  std::vector<std::string> allowed_actions;
  std::vector<std::string> words;
  bool only_words = false;

  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (only_words || arg.empty() || arg[0] != '-' || arg == "-") {
      words.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_words = true;
      continue;
    }
    if (arg == "-h" || arg == "--help") {
      std::fputs(kUsage, stdout);
      return 0;
    }
    if (arg == "--list") {
      list = true;
      continue;
    }
    if (arg == "--info") {
      info = true;
      continue;
    }
    if (arg == "--no-actions") {
      restrict_actions = true;
      continue;
    }
    if (i + 1 >= argc) return Usage(arg + " needs a value");
    const std::string value = argv[++i];
    if (arg == "--address") {
      address = value;
    } else if (arg == "--token") {
      token = value;
    } else if (arg == "--character") {
      character = value;
    } else if (arg == "--session") {
      session = value;
    } else if (arg == "--player-name") {
      player_name = value;
    } else if (arg == "--max-tokens") {
      if (!ParseLong(value, &max_tokens)) return Usage("--max-tokens: not an integer: " + value);
    } else if (arg == "--deadline-ms") {
      if (!ParseLong(value, &deadline_ms) || deadline_ms <= 0) return Usage("--deadline-ms: not a positive integer");
    } else if (arg == "--temperature") {
      if (!ParseDouble(value, &temperature)) return Usage("--temperature: not a number: " + value);
      has_temperature = true;
    } else if (arg == "--seed") {
      if (!ParseLong(value, &seed)) return Usage("--seed: not an integer: " + value);
      has_seed = true;
    } else if (arg == "--entity") {
      const auto equals = value.find('=');
      if (equals == std::string::npos || equals == 0) return Usage("--entity: not LIST=VALUE: " + value);
      entities[value.substr(0, equals)].push_back(value.substr(equals + 1));
    } else if (arg == "--allow-action") {
      restrict_actions = true;
      allowed_actions.push_back(value);
    } else {
      return Usage("unknown option " + arg);
    }
  }

  const auto deadline = std::chrono::milliseconds(deadline_ms);  // 0: the client's default (60 s)
  npc::NpcDialogueClient client(address, token);

  if (list) {
    auto characters = client.ListCharacters(deadline);
    if (!characters.ok()) return Fail(characters.error);
    for (const auto& c : characters.value) {
      std::string actions;  // "\tactions=sell_item,open_gate" when it declares any
      for (const auto& action : c.actions()) actions += (actions.empty() ? "\tactions=" : ",") + action.name();
      std::printf("%s\t%s\t%s%s%s%s\n", c.id().c_str(), c.name().c_str(), CharacterStatusName(c.status()),
                  c.has_adapter() ? "\tadapter" : "", actions.c_str(),
                  c.error().empty() ? "" : ("\t" + c.error()).c_str());
    }
    return 0;
  }
  if (info) {
    auto server = client.GetServerInfo(deadline);
    if (!server.ok()) return Fail(server.error);
    const auto& s = server.value;
    std::printf("npc-sidecar %s: model %s (%s) on %s, backend %s; %d/%d replies active, %d waiting, %d sessions\n",
                s.version().c_str(), s.model().c_str(), s.weights().c_str(), s.device().c_str(),
                s.backend().c_str(), s.active_sequences(), s.max_batch(), s.waiting_requests(), s.sessions());
    return 0;
  }

  if (character.empty()) return Usage("--character is required");
  if (words.empty()) return Usage("the player's line is missing");
  std::string line;
  for (const auto& word : words) line += (line.empty() ? "" : " ") + word;

  npc::v1::TalkRequest request;
  request.set_character_id(character);
  request.set_session_id(session);
  request.set_player_line(line);
  request.set_player_name(player_name);
  auto* options = request.mutable_options();
  // Out-of-range values go to the server as they are (clamped to int32), which answers INVALID_ARGUMENT.
  if (max_tokens > 2147483647LL) max_tokens = 2147483647LL;
  if (max_tokens < -2147483647LL) max_tokens = -2147483647LL;
  options->set_max_tokens(static_cast<int>(max_tokens));
  if (has_temperature) options->set_temperature(static_cast<float>(temperature));
  if (has_seed) options->set_seed(static_cast<unsigned long long>(seed));
  for (const auto& entry : entities) npc::AddEntities(request, entry.first, entry.second);
  if (restrict_actions) npc::SetAllowedActions(request, allowed_actions);

  // The callbacks run on the client's worker thread; main only waits. (A game would hand each
  // piece to its game thread instead of printing it.)
  std::mutex mu;
  bool printed = false;       // something of the line is on stdout
  bool line_ended = false;    // and its newline too
  bool ok = false;
  npc::Error error;
  npc::v1::Finished finished;
  npc::TalkCallbacks callbacks;
  callbacks.on_emotion = [&](const std::string& label) {
    std::lock_guard<std::mutex> lock(mu);
    std::printf("[%s] ", label.c_str());
    std::fflush(stdout);
    printed = true;
  };
  callbacks.on_delta = [&](const std::string& text) {
    std::lock_guard<std::mutex> lock(mu);
    std::fwrite(text.data(), 1, text.size(), stdout);
    std::fflush(stdout);
    printed = true;
  };
  callbacks.on_action = [&](const npc::v1::Action& action) {
    std::lock_guard<std::mutex> lock(mu);
    if (!line_ended) std::fputc('\n', stdout);  // actions come after the whole line
    printed = line_ended = true;
    std::printf("-> %s\n", npc::FormatAction(action).c_str());
    std::fflush(stdout);
  };
  callbacks.on_finished = [&](const npc::v1::Finished& done) {
    std::lock_guard<std::mutex> lock(mu);
    finished = done;
    ok = true;
  };
  callbacks.on_error = [&](const npc::Error& failure) {
    std::lock_guard<std::mutex> lock(mu);
    error = failure;
  };

  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  const npc::CallId id = client.Talk(request, std::move(callbacks), deadline);
  bool cancelled = false;
  while (!client.Wait(id, std::chrono::milliseconds(50))) {
    if (g_interrupted.load() && !cancelled) {
      client.Cancel(id);  // from another thread than the call's: what a game does on EndPlay
      cancelled = true;
    }
  }

  std::lock_guard<std::mutex> lock(mu);
  if ((printed || ok) && !line_ended) {
    std::fputc('\n', stdout);
    std::fflush(stdout);
  }
  if (cancelled) {
    std::fprintf(stderr, "interrupted (%s)\n", npc::StatusCodeName(error.code));
    return 130;
  }
  if (!ok) return Fail(error);
  const auto& usage = finished.usage();
  const auto& timings = finished.timings();
  std::fprintf(stderr,
               "finish: %s, emotion: %s, actions: %d, first token: %.0f ms, total: %.0f ms, tokens: %d prompt "
               "(%d cached) + %d reply\n",
               FinishReasonName(finished.reason()), finished.emotion().empty() ? "-" : finished.emotion().c_str(),
               finished.actions_size(), timings.first_token_ms(), timings.total_ms(), usage.prompt_tokens(),
               usage.cached_prompt_tokens(), usage.completion_tokens());
  return 0;
}
