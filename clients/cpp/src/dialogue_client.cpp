#include "npc/dialogue_client.h"

#include <condition_variable>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>

#include <grpcpp/grpcpp.h>

#include "npc/v1/dialogue.grpc.pb.h"

namespace npc {

const char* StatusCodeName(grpc::StatusCode code) {
  switch (code) {
    case grpc::StatusCode::OK: return "OK";
    case grpc::StatusCode::CANCELLED: return "CANCELLED";
    case grpc::StatusCode::UNKNOWN: return "UNKNOWN";
    case grpc::StatusCode::INVALID_ARGUMENT: return "INVALID_ARGUMENT";
    case grpc::StatusCode::DEADLINE_EXCEEDED: return "DEADLINE_EXCEEDED";
    case grpc::StatusCode::NOT_FOUND: return "NOT_FOUND";
    case grpc::StatusCode::ALREADY_EXISTS: return "ALREADY_EXISTS";
    case grpc::StatusCode::PERMISSION_DENIED: return "PERMISSION_DENIED";
    case grpc::StatusCode::RESOURCE_EXHAUSTED: return "RESOURCE_EXHAUSTED";
    case grpc::StatusCode::FAILED_PRECONDITION: return "FAILED_PRECONDITION";
    case grpc::StatusCode::ABORTED: return "ABORTED";
    case grpc::StatusCode::OUT_OF_RANGE: return "OUT_OF_RANGE";
    case grpc::StatusCode::UNIMPLEMENTED: return "UNIMPLEMENTED";
    case grpc::StatusCode::INTERNAL: return "INTERNAL";
    case grpc::StatusCode::UNAVAILABLE: return "UNAVAILABLE";
    case grpc::StatusCode::DATA_LOSS: return "DATA_LOSS";
    case grpc::StatusCode::UNAUTHENTICATED: return "UNAUTHENTICATED";
    default: break;
  }
  return "UNKNOWN_CODE";
}

void AddEntities(v1::TalkRequest& request, const std::string& name, const std::vector<std::string>& values) {
  v1::EntityList& list = (*request.mutable_entities())[name];
  for (const auto& value : values) list.add_values(value);
}

void SetAllowedActions(v1::TalkRequest& request, const std::vector<std::string>& names) {
  v1::AllowedActions* allowed = request.mutable_allowed_actions();  // set, even when names is empty
  allowed->clear_names();
  for (const auto& name : names) allowed->add_names(name);
}

const v1::ActionArgument* FindArgument(const v1::Action& action, const std::string& name) {
  for (const auto& argument : action.arguments()) {
    if (argument.name() == name) return &argument;
  }
  return nullptr;
}

namespace {

// A quoted string as JSON writes it: \" \\ \b \f \n \r \t, other control characters as \u00XX, the rest
// (UTF-8 included) as it is.
void AppendQuoted(std::string& out, const std::string& text) {
  static const char kHex[] = "0123456789abcdef";
  out += '"';
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default: {
        const auto byte = static_cast<unsigned char>(c);
        if (byte < 0x20) {
          out += "\\u00";
          out += kHex[byte >> 4];
          out += kHex[byte & 0xf];
        } else {
          out += c;
        }
      }
    }
  }
  out += '"';
}

}  // namespace

std::string FormatAction(const v1::Action& action) {
  std::string out = action.name() + "(";
  bool first = true;
  for (const auto& argument : action.arguments()) {
    if (!first) out += ", ";
    first = false;
    out += argument.name() + "=";
    switch (argument.value_case()) {
      case v1::ActionArgument::kStringValue: AppendQuoted(out, argument.string_value()); break;
      case v1::ActionArgument::kIntValue: out += std::to_string(argument.int_value()); break;
      case v1::ActionArgument::kBoolValue: out += argument.bool_value() ? "true" : "false"; break;
      default: out += "?"; break;  // a value type a newer server added
    }
  }
  out += ")";
  return out;
}

namespace {

using Stub = v1::NpcDialogue::Stub;

Error ToError(const grpc::Status& status) {
  return Error{status.error_code(), status.error_message()};
}

// One Talk call: its context (what Cancel() reaches) and its worker thread. Shared between the
// client and the worker, so a worker never touches the client itself and may outlive it.
struct Call {
  grpc::ClientContext context;
  std::thread worker;            // set once, under the client's mu, before anyone else sees the call
  std::thread::id worker_id;     // the same, readable without touching `worker` (which join() changes)
  std::mutex mu;
  std::condition_variable ended_cv;
  bool ended = false;  // guarded by mu: the last callback has returned

  ~Call() {
    // Always joined or detached before; a last guard so that a std::thread is never destroyed
    // joinable (which would terminate the process).
    if (worker.joinable()) worker.detach();
  }

  bool HasEnded() {
    std::lock_guard<std::mutex> lock(mu);
    return ended;
  }
};

// The last step of a call's worker thread, after its callbacks are released (so whatever they held
// is gone once Wait() returns or the worker is joined).
void MarkEnded(Call& call) {
  std::lock_guard<std::mutex> lock(call.mu);
  call.ended = true;
  call.ended_cv.notify_all();
}

// After a stream's last event: on_finished with its Finished event when the call ended OK with one,
// else on_error.
template <class Event, class Done>
void EndStream(grpc::ClientReader<Event>& reader, bool got_finished, const Done& finished,
               const std::function<void(const Done&)>& on_finished, const std::function<void(const Error&)>& on_error,
               const char* missing) {
  const grpc::Status status = reader.Finish();
  if (status.ok() && got_finished) {
    if (on_finished) on_finished(finished);
  } else if (on_error) {
    on_error(status.ok() ? Error{grpc::StatusCode::UNKNOWN, missing} : ToError(status));
  }
}

// The body of a Talk call's worker thread. It owns the callbacks.
void RunTalk(const std::shared_ptr<Stub>& stub, const std::shared_ptr<Call>& call, const v1::TalkRequest& request,
             TalkCallbacks callbacks) {
  {
    std::unique_ptr<grpc::ClientReader<v1::TalkEvent>> reader = stub->Talk(&call->context, request);
    v1::TalkEvent event;
    v1::Finished finished;
    bool got_finished = false;
    while (reader->Read(&event)) {
      switch (event.event_case()) {
        case v1::TalkEvent::kStarted:
          if (callbacks.on_started) callbacks.on_started(event.started());
          break;
        case v1::TalkEvent::kDelta:
          if (callbacks.on_delta) callbacks.on_delta(event.delta().text());
          break;
        case v1::TalkEvent::kEmotion:
          if (callbacks.on_emotion) callbacks.on_emotion(event.emotion().label());
          break;
        case v1::TalkEvent::kAction:
          if (callbacks.on_action) callbacks.on_action(event.action());
          break;
        case v1::TalkEvent::kFinished:
          finished.Swap(event.mutable_finished());
          got_finished = true;
          break;
        default:  // an event a newer server added: ignored, as the proto asks
          break;
      }
    }
    EndStream(*reader, got_finished, finished, callbacks.on_finished, callbacks.on_error,
              "the reply ended without a Finished event");
  }
  callbacks = TalkCallbacks();
  MarkEnded(*call);
}

// The body of a StartScene call's worker thread, as RunTalk.
void RunScene(const std::shared_ptr<Stub>& stub, const std::shared_ptr<Call>& call, const v1::SceneRequest& request,
              SceneCallbacks callbacks) {
  {
    std::unique_ptr<grpc::ClientReader<v1::SceneEvent>> reader = stub->StartScene(&call->context, request);
    v1::SceneEvent event;
    v1::SceneFinished finished;
    bool got_finished = false;
    while (reader->Read(&event)) {
      switch (event.event_case()) {
        case v1::SceneEvent::kStarted:
          if (callbacks.on_started) callbacks.on_started(event.started());
          break;
        case v1::SceneEvent::kLine:
          if (callbacks.on_line) callbacks.on_line(event.line());
          break;
        case v1::SceneEvent::kFinished:
          finished.Swap(event.mutable_finished());
          got_finished = true;
          break;
        default:  // an event a newer server added: ignored, as the proto asks
          break;
      }
    }
    EndStream(*reader, got_finished, finished, callbacks.on_finished, callbacks.on_error,
              "the scene ended without a Finished event");
  }
  callbacks = SceneCallbacks();
  MarkEnded(*call);
}

void JoinOrDetach(std::thread& worker) {
  if (!worker.joinable()) return;
  if (worker.get_id() == std::this_thread::get_id()) {
    worker.detach();  // destroyed from inside one of its own callbacks: it ends on its own
  } else {
    worker.join();
  }
}

}  // namespace

struct NpcDialogueClient::Impl {
  std::string address;
  std::string authorization;  // "Bearer <token>", or empty
  std::chrono::milliseconds default_deadline;
  std::shared_ptr<grpc::Channel> channel;
  std::shared_ptr<Stub> stub;

  mutable std::mutex mu;
  CallId next_id = 1;
  bool closing = false;                                      // guarded by mu: the destructor has begun
  std::unordered_map<CallId, std::shared_ptr<Call>> calls;  // guarded by mu

  void Prepare(grpc::ClientContext& context, std::chrono::milliseconds deadline) const {
    if (deadline == std::chrono::milliseconds::zero()) deadline = default_deadline;
    // Anything beyond a year counts as no deadline (and cannot overflow the clock).
    if (deadline < std::chrono::hours(24 * 365)) {
      if (deadline < std::chrono::milliseconds::zero()) deadline = std::chrono::milliseconds::zero();
      context.set_deadline(std::chrono::system_clock::now() + deadline);
    }
    if (!authorization.empty()) context.AddMetadata("authorization", authorization);
  }

  // Removes the calls that have ended; the caller joins their workers after releasing mu.
  std::vector<std::shared_ptr<Call>> TakeEndedLocked() {
    std::vector<std::shared_ptr<Call>> ended;
    for (auto it = calls.begin(); it != calls.end();) {
      if (it->second->HasEnded()) {
        ended.push_back(std::move(it->second));
        it = calls.erase(it);
      } else {
        ++it;
      }
    }
    return ended;
  }

  // Starts a streaming call on a worker thread of its own running `body`; its id, or 0 (on_error with
  // CANCELLED at once) while the client is being destroyed.
  using Body = std::function<void(const std::shared_ptr<Stub>&, const std::shared_ptr<Call>&)>;
  CallId Launch(std::chrono::milliseconds deadline, const std::function<void(const Error&)>& on_error, Body body) {
    auto call = std::make_shared<Call>();
    Prepare(call->context, deadline);
    std::vector<std::shared_ptr<Call>> ended;
    CallId id = 0;
    {
      std::unique_lock<std::mutex> lock(mu);
      if (closing) {  // a call started from a callback while the client is being destroyed
        lock.unlock();
        if (on_error) on_error(Error{grpc::StatusCode::CANCELLED, "the client is shutting down"});
        return 0;
      }
      ended = TakeEndedLocked();
      id = next_id++;
      // The worker holds what it needs (stub, call, the body with its request and callbacks), never
      // the client. It starts under mu, so Cancel/Wait/the destructor see the call with its thread.
      call->worker = std::thread([stub = stub, call, body = std::move(body)]() mutable { body(stub, call); });
      call->worker_id = call->worker.get_id();
      calls.emplace(id, std::move(call));
    }
    for (auto& old : ended) JoinOrDetach(old->worker);  // they have ended: this returns at once
    return id;
  }

  template <class Response, class Request, class Method>
  Result<Response> Unary(Method method, const Request& request, std::chrono::milliseconds deadline) {
    grpc::ClientContext context;
    Prepare(context, deadline);
    Result<Response> result;
    result.error = ToError((stub.get()->*method)(&context, request, &result.value));
    return result;
  }
};

NpcDialogueClient::NpcDialogueClient(std::string address, std::string auth_token,
                                     std::chrono::milliseconds default_deadline)
    : impl_(new Impl) {
  impl_->address = std::move(address);
  if (!auth_token.empty()) impl_->authorization = "Bearer " + auth_token;
  impl_->default_deadline =
      default_deadline == std::chrono::milliseconds::zero() ? kDefaultDeadline : default_deadline;
  impl_->channel = grpc::CreateChannel(impl_->address, grpc::InsecureChannelCredentials());
  impl_->stub = std::shared_ptr<Stub>(v1::NpcDialogue::NewStub(impl_->channel).release());
}

NpcDialogueClient::~NpcDialogueClient() {
  std::unordered_map<CallId, std::shared_ptr<Call>> calls;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    impl_->closing = true;
    calls.swap(impl_->calls);
  }
  for (auto& entry : calls) entry.second->context.TryCancel();
  for (auto& entry : calls) JoinOrDetach(entry.second->worker);
}

CallId NpcDialogueClient::Talk(const v1::TalkRequest& request, TalkCallbacks callbacks,
                               std::chrono::milliseconds deadline) {
  auto on_error = callbacks.on_error;
  return impl_->Launch(deadline, on_error,
                       [request, callbacks = std::move(callbacks)](const std::shared_ptr<Stub>& stub,
                                                                   const std::shared_ptr<Call>& call) mutable {
                         RunTalk(stub, call, request, std::move(callbacks));
                       });
}

CallId NpcDialogueClient::StartScene(const v1::SceneRequest& request, SceneCallbacks callbacks,
                                     std::chrono::milliseconds deadline) {
  auto on_error = callbacks.on_error;
  return impl_->Launch(deadline == std::chrono::milliseconds::zero() ? kNoDeadline : deadline, on_error,
                       [request, callbacks = std::move(callbacks)](const std::shared_ptr<Stub>& stub,
                                                                   const std::shared_ptr<Call>& call) mutable {
                         RunScene(stub, call, request, std::move(callbacks));
                       });
}

CallId NpcDialogueClient::Talk(const v1::TalkRequest& request, std::function<void(const std::string&)> on_delta,
                               std::function<void(const v1::Finished&)> on_finished,
                               std::function<void(const Error&)> on_error, std::chrono::milliseconds deadline) {
  TalkCallbacks callbacks;
  callbacks.on_delta = std::move(on_delta);
  callbacks.on_finished = std::move(on_finished);
  callbacks.on_error = std::move(on_error);
  return Talk(request, std::move(callbacks), deadline);
}

bool NpcDialogueClient::Cancel(CallId id) {
  std::lock_guard<std::mutex> lock(impl_->mu);
  auto it = impl_->calls.find(id);
  if (it == impl_->calls.end() || it->second->HasEnded()) return false;
  it->second->context.TryCancel();  // thread-safe; the context lives as long as the Call
  return true;
}

void NpcDialogueClient::Cancel() {
  std::lock_guard<std::mutex> lock(impl_->mu);
  for (auto& entry : impl_->calls) {
    if (!entry.second->HasEnded()) entry.second->context.TryCancel();
  }
}

bool NpcDialogueClient::Wait(CallId id, std::chrono::milliseconds timeout) {
  std::shared_ptr<Call> call;
  {
    std::lock_guard<std::mutex> lock(impl_->mu);
    auto it = impl_->calls.find(id);
    if (it == impl_->calls.end()) return true;
    call = it->second;
  }
  if (call->worker_id == std::this_thread::get_id()) return false;  // from its own callback
  std::unique_lock<std::mutex> lock(call->mu);
  return call->ended_cv.wait_for(lock, timeout, [&call] { return call->ended; });
}

std::size_t NpcDialogueClient::ActiveCalls() const {
  std::lock_guard<std::mutex> lock(impl_->mu);
  std::size_t active = 0;
  for (const auto& entry : impl_->calls) active += entry.second->HasEnded() ? 0 : 1;
  return active;
}

Result<std::vector<v1::Character>> NpcDialogueClient::ListCharacters(std::chrono::milliseconds deadline) {
  auto reply = impl_->Unary<v1::ListCharactersResponse>(&Stub::ListCharacters, v1::ListCharactersRequest(), deadline);
  Result<std::vector<v1::Character>> result;
  result.error = std::move(reply.error);
  if (result.ok()) {
    result.value.reserve(static_cast<std::size_t>(reply.value.characters_size()));
    for (auto& character : *reply.value.mutable_characters()) result.value.push_back(std::move(character));
  }
  return result;
}

Result<v1::ServerInfo> NpcDialogueClient::GetServerInfo(std::chrono::milliseconds deadline) {
  return impl_->Unary<v1::ServerInfo>(&Stub::GetServerInfo, v1::GetServerInfoRequest(), deadline);
}

Result<int> NpcDialogueClient::ResetSession(const std::string& session_id, const std::string& character_id,
                                            std::chrono::milliseconds deadline) {
  v1::ResetSessionRequest request;
  request.set_session_id(session_id);
  request.set_character_id(character_id);
  auto reply = impl_->Unary<v1::ResetSessionResponse>(&Stub::ResetSession, request, deadline);
  Result<int> result;
  result.error = std::move(reply.error);
  result.value = reply.value.forgotten_turns();
  return result;
}

Result<v1::SessionState> NpcDialogueClient::ExportSession(const std::string& session_id,
                                                          const std::string& character_id,
                                                          std::chrono::milliseconds deadline) {
  v1::ExportSessionRequest request;
  request.set_session_id(session_id);
  request.set_character_id(character_id);
  return impl_->Unary<v1::SessionState>(&Stub::ExportSession, request, deadline);
}

Result<v1::ImportSessionResponse> NpcDialogueClient::ImportSession(const v1::SessionState& state, bool overwrite,
                                                                   std::chrono::milliseconds deadline) {
  v1::ImportSessionRequest request;
  *request.mutable_state() = state;
  request.set_overwrite(overwrite);
  return impl_->Unary<v1::ImportSessionResponse>(&Stub::ImportSession, request, deadline);
}

namespace {
Result<std::vector<v1::Relationship>> Values(Result<v1::RelationshipsResponse> reply) {
  Result<std::vector<v1::Relationship>> result;
  result.error = std::move(reply.error);
  result.value.assign(reply.value.relationships().begin(), reply.value.relationships().end());
  return result;
}

v1::SetRelationshipRequest RelationshipRequest(const std::string& session_id, const std::string& character_id,
                                               const std::string& name) {
  v1::SetRelationshipRequest request;
  request.set_session_id(session_id);
  request.set_character_id(character_id);
  request.set_name(name);
  return request;
}
}  // namespace

Result<std::vector<v1::Relationship>> NpcDialogueClient::GetRelationships(const std::string& session_id,
                                                                          const std::string& character_id,
                                                                          std::chrono::milliseconds deadline) {
  v1::GetRelationshipsRequest request;
  request.set_session_id(session_id);
  request.set_character_id(character_id);
  return Values(impl_->Unary<v1::RelationshipsResponse>(&Stub::GetRelationships, request, deadline));
}

Result<std::vector<v1::Relationship>> NpcDialogueClient::SetRelationship(const std::string& session_id,
                                                                         const std::string& character_id,
                                                                         const std::string& name, std::int64_t value,
                                                                         std::chrono::milliseconds deadline) {
  v1::SetRelationshipRequest request = RelationshipRequest(session_id, character_id, name);
  request.set_value(value);
  return Values(impl_->Unary<v1::RelationshipsResponse>(&Stub::SetRelationship, request, deadline));
}

Result<std::vector<v1::Relationship>> NpcDialogueClient::ChangeRelationship(const std::string& session_id,
                                                                            const std::string& character_id,
                                                                            const std::string& name, std::int64_t delta,
                                                                            std::chrono::milliseconds deadline) {
  v1::SetRelationshipRequest request = RelationshipRequest(session_id, character_id, name);
  request.set_delta(delta);
  return Values(impl_->Unary<v1::RelationshipsResponse>(&Stub::SetRelationship, request, deadline));
}

const std::string& NpcDialogueClient::address() const { return impl_->address; }

}  // namespace npc
