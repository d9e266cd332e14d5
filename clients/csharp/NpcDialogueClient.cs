// A friendly C# client for the npc-sidecar (proto/npc/v1/dialogue.proto), for Unity, Godot .NET
// and any .NET program. It wraps the generated NpcDialogue.NpcDialogueClient (Generated/) with:
//   * TalkAsync: the streamed reply as IAsyncEnumerable<TalkEvent>, cancelled by a CancellationToken:
//     Started, Emotion (when the character declares emotions), Delta..., Action... (what the NPC
//     does, after the text), Finished;
//   * TalkRequest helpers for the game's lists and the allowed actions (AddEntities, AllowActions),
//     and NpcActions to read an action's arguments (Arguments, Format);
//   * ListCharactersAsync, GetServerInfoAsync, ResetSessionAsync;
//   * ExportSession / ImportSession helpers, also to and from byte[] for save files;
//   * GetRelationshipsAsync, SetRelationshipAsync, ChangeRelationshipAsync (trust, respect, ... per session);
//   * the bearer token (`authorization: Bearer T`) on every call when one is given;
//   * a deadline on every call (TalkTimeout, CallTimeout, or a per-call timeout).
//
// Needs the NuGet packages Grpc.Net.Client (which brings Grpc.Core.Api and Grpc.Net.Common) and
// Google.Protobuf, C# 8 or later, and netstandard2.1 / .NET Core 3.0 or later (IAsyncEnumerable).
// See README.md beside this file.
//
// Errors. A failed call throws Grpc.Core.RpcException; read e.StatusCode and e.Status.Detail (one
// line, for INVALID_ARGUMENT starting with the field's path). The codes the sidecar uses:
//   InvalidArgument     a field is missing, malformed or out of range (the detail names it)
//   NotFound            unknown character (Talk), or a session the sidecar does not hold (ExportSession)
//   AlreadyExists       ImportSession without overwrite onto a session the sidecar holds
//   FailedPrecondition  the character exists but none of its versions loaded
//   ResourceExhausted   too many replies waiting for the model: retry after a short backoff
//   Unauthenticated     missing or wrong auth token
//   DeadlineExceeded    the call's deadline (timeout) passed; a reply in progress is stopped
//   Unavailable         the sidecar is not running (or not reachable), or is shutting down
//   Cancelled           the call was cancelled by something other than your token (e.g. the
//                       channel was disposed)
// Cancelling through your own CancellationToken is not an error: it throws
// OperationCanceledException (whatever GrpcChannelOptions.ThrowOperationCanceledOnCancellation says).
// ImportSessionBytesAsync throws Google.Protobuf.InvalidProtocolBufferException for bytes that are
// not a SessionState.
//
// Threading: every method is asynchronous and never blocks the calling thread. Awaiting them (or
// `await foreach` over TalkAsync) from Unity's or Godot's main thread resumes on the main thread,
// through the engine's SynchronizationContext, so the code after an await may touch the scene.
//
// Naming: the generated message Npc.V1.Action (an action the NPC takes) shares its name with
// System.Action. In a file with both `using System;` and `using Npc.V1;`, write `Npc.V1.Action`
// (or add `using NpcAction = Npc.V1.Action;`); the generic System.Action<T> is not affected.

#nullable enable

using System;
using System.Collections.Generic;
using System.Runtime.CompilerServices;
using System.Threading;
using System.Threading.Tasks;
using Google.Protobuf;
using Grpc.Core;
using Npc.V1;

namespace Npc.Client
{
    /// <summary>
    /// A client of one npc-sidecar. Thread-safe; create one per channel and share it. It does not
    /// own the channel: dispose the channel yourself when the game shuts down.
    /// </summary>
    public sealed class NpcDialogueClient
    {
        /// <summary>Default deadline of a whole streamed reply (TalkAsync).</summary>
        public static readonly TimeSpan DefaultTalkTimeout = TimeSpan.FromMinutes(2);

        /// <summary>Default deadline of the other calls.</summary>
        public static readonly TimeSpan DefaultCallTimeout = TimeSpan.FromSeconds(10);

        private readonly NpcDialogue.NpcDialogueClient _stub;
        private readonly string? _authToken;

        /// <summary>A client over a channel, e.g. <c>GrpcChannel.ForAddress("http://127.0.0.1:50051")</c>
        /// (Grpc.Net.Client; in Unity with YetAnotherHttpHandler as its HttpHandler).</summary>
        /// <param name="channel">The channel to the sidecar.</param>
        /// <param name="authToken">The sidecar's --auth-token, sent as <c>authorization: Bearer</c>
        /// metadata on every call; null or empty sends none.</param>
        public NpcDialogueClient(ChannelBase channel, string? authToken = null)
            : this(new NpcDialogue.NpcDialogueClient(channel ?? throw new ArgumentNullException(nameof(channel))), authToken)
        {
        }

        /// <summary>A client over a call invoker (for interceptors or tests).</summary>
        public NpcDialogueClient(CallInvoker callInvoker, string? authToken = null)
            : this(new NpcDialogue.NpcDialogueClient(callInvoker ?? throw new ArgumentNullException(nameof(callInvoker))), authToken)
        {
        }

        /// <summary>A client over a generated stub (for test doubles).</summary>
        public NpcDialogueClient(NpcDialogue.NpcDialogueClient stub, string? authToken = null)
        {
            _stub = stub ?? throw new ArgumentNullException(nameof(stub));
            _authToken = string.IsNullOrEmpty(authToken) ? null : authToken;
        }

        /// <summary>The generated client, for calls this wrapper does not cover.</summary>
        public NpcDialogue.NpcDialogueClient Stub => _stub;

        /// <summary>Deadline of a whole streamed reply, from the call's start.
        /// <see cref="Timeout.InfiniteTimeSpan"/>: none.</summary>
        public TimeSpan TalkTimeout { get; set; } = DefaultTalkTimeout;

        /// <summary>Deadline of every other call. <see cref="Timeout.InfiniteTimeSpan"/>: none.</summary>
        public TimeSpan CallTimeout { get; set; } = DefaultCallTimeout;

        // ------------------------------------------------------------------------------------
        // Talk

        /// <summary>
        /// One NPC reply, streamed: one <c>Started</c>; one <c>Emotion</c> (its <c>Label</c>, one of
        /// <c>Character.Emotions</c>) before the text when the character declares emotions; zero or
        /// more <c>Delta</c>s (append their text); zero to 3 <c>Action</c>s after the text (what the
        /// NPC does: name and typed arguments, see <see cref="NpcActions"/>); then one <c>Finished</c>
        /// (full text, emotion, actions again, usage). Deadline: <see cref="TalkTimeout"/>.
        /// </summary>
        /// <remarks>
        /// The game's lists that an action's arguments take values from and the actions allowed go
        /// in the request: <see cref="NpcTalkRequests.AddEntities(TalkRequest, string, string[])"/>,
        /// <see cref="NpcTalkRequests.AllowActions(TalkRequest, string[])"/>. A game that must not
        /// act on a reply that then fails carries out <c>Finished.Actions</c> rather than each
        /// <c>Action</c> event.
        /// Read the stream to its end: leaving an <c>await foreach</c> early (break, return, an
        /// exception) disposes the call, which cancels it, and a cancelled reply is not added to
        /// the session. When <paramref name="cancellationToken"/> fires (e.g. the NPC's object is
        /// disabled), the call is cancelled on the sidecar and the enumeration throws
        /// <see cref="OperationCanceledException"/>. Failures throw <see cref="RpcException"/>; input
        /// errors come before the first event.
        /// </remarks>
        public async IAsyncEnumerable<TalkEvent> TalkAsync(
            TalkRequest request, [EnumeratorCancellation] CancellationToken cancellationToken = default)
        {
            await foreach (TalkEvent talkEvent in TalkCore(request, null, cancellationToken).ConfigureAwait(false))
            {
                yield return talkEvent;
            }
        }

        /// <summary>As <see cref="TalkAsync(TalkRequest, CancellationToken)"/>, with this call's own
        /// deadline: <paramref name="timeout"/> from now (null: <see cref="TalkTimeout"/>;
        /// <see cref="Timeout.InfiniteTimeSpan"/>: none).</summary>
        public async IAsyncEnumerable<TalkEvent> TalkAsync(
            TalkRequest request, TimeSpan? timeout, [EnumeratorCancellation] CancellationToken cancellationToken = default)
        {
            await foreach (TalkEvent talkEvent in TalkCore(request, timeout, cancellationToken).ConfigureAwait(false))
            {
                yield return talkEvent;
            }
        }

        private IAsyncEnumerable<TalkEvent> TalkCore(
            TalkRequest request, TimeSpan? timeout, CancellationToken cancellationToken)
        {
            if (request == null)
            {
                throw new ArgumentNullException(nameof(request));
            }
            return StreamCore(options => _stub.Talk(request, options), timeout ?? TalkTimeout,
                "The NPC reply was cancelled.", cancellationToken);
        }

        // ------------------------------------------------------------------------------------
        // Scenes

        /// <summary>
        /// A scene: characters talking among themselves while the player is elsewhere (StartScene in
        /// dialogue.proto). One <c>Started</c> (the scene's id and the names of its characters); then a
        /// <c>Line</c> for every event of every line, in order (<c>Line.Index</c>, <c>Line.CharacterId</c>,
        /// and <c>Line.Event</c>: that line's Started, Emotion, Delta, Action or Finished, as a Talk sends
        /// them); then one <c>Finished</c> (how many lines were said).
        /// </summary>
        /// <remarks>
        /// No deadline unless <paramref name="timeout"/> gives one (a scene takes a while). Cancelling
        /// <paramref name="cancellationToken"/> or leaving the <c>await foreach</c> early stops the scene
        /// within one engine step; the lines already said stay in the session. A TalkAsync to one of the
        /// scene's characters with the scene's session id is the player stepping in.
        /// </remarks>
        public IAsyncEnumerable<SceneEvent> StartSceneAsync(
            SceneRequest request, TimeSpan? timeout = null, CancellationToken cancellationToken = default)
        {
            if (request == null)
            {
                throw new ArgumentNullException(nameof(request));
            }
            return StreamCore(options => _stub.StartScene(request, options), timeout ?? Timeout.InfiniteTimeSpan,
                "The scene was cancelled.", cancellationToken);
        }

        private async IAsyncEnumerable<TEvent> StreamCore<TEvent>(
            Func<CallOptions, AsyncServerStreamingCall<TEvent>> start, TimeSpan timeout, string cancelledMessage,
            [EnumeratorCancellation] CancellationToken cancellationToken)
        {
            cancellationToken.ThrowIfCancellationRequested();
            // Disposing the call (end of the using scope) cancels it if it is still running.
            using AsyncServerStreamingCall<TEvent> call = start(Options(timeout, cancellationToken));
            IAsyncStreamReader<TEvent> stream = call.ResponseStream;
            while (true)
            {
                bool more;
                try
                {
                    more = await stream.MoveNext(cancellationToken).ConfigureAwait(false);
                }
                catch (RpcException e) when (e.StatusCode == StatusCode.Cancelled && cancellationToken.IsCancellationRequested)
                {
                    throw new OperationCanceledException(cancelledMessage, e, cancellationToken);
                }
                if (!more)
                {
                    yield break;
                }
                yield return stream.Current;
            }
        }

        // ------------------------------------------------------------------------------------
        // Characters and server

        /// <summary>Every character the sidecar knows of, ordered by id, including those whose
        /// files failed to load (<c>Serving</c> false, <c>Error</c> says why).</summary>
        public Task<IReadOnlyList<Character>> ListCharactersAsync(CancellationToken cancellationToken = default)
        {
            return ListCharactersAsync(null, cancellationToken);
        }

        /// <summary>As <see cref="ListCharactersAsync(CancellationToken)"/>, with this call's own
        /// timeout (null: <see cref="CallTimeout"/>; <see cref="Timeout.InfiniteTimeSpan"/>: none).</summary>
        public async Task<IReadOnlyList<Character>> ListCharactersAsync(
            TimeSpan? timeout, CancellationToken cancellationToken = default)
        {
            ListCharactersResponse response = await UnaryAsync(
                options => _stub.ListCharactersAsync(new ListCharactersRequest(), options),
                timeout, cancellationToken).ConfigureAwait(false);
            return new List<Character>(response.Characters);
        }

        /// <summary>The model, its limits and the load right now; cheap enough to poll.</summary>
        public Task<ServerInfo> GetServerInfoAsync(CancellationToken cancellationToken = default)
        {
            return GetServerInfoAsync(null, cancellationToken);
        }

        /// <summary>As <see cref="GetServerInfoAsync(CancellationToken)"/>, with this call's own
        /// timeout (null: <see cref="CallTimeout"/>; <see cref="Timeout.InfiniteTimeSpan"/>: none).</summary>
        public Task<ServerInfo> GetServerInfoAsync(TimeSpan? timeout, CancellationToken cancellationToken = default)
        {
            return UnaryAsync(
                options => _stub.GetServerInfoAsync(new GetServerInfoRequest(), options), timeout, cancellationToken);
        }

        // ------------------------------------------------------------------------------------
        // Sessions

        /// <summary>Forgets a session (or only <paramref name="characterId"/>'s turns in it) so the
        /// next reply starts fresh. Idempotent. Returns the number of turns forgotten.</summary>
        public async Task<int> ResetSessionAsync(
            string sessionId, string characterId = "", TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            var request = new ResetSessionRequest { SessionId = sessionId ?? "", CharacterId = characterId ?? "" };
            ResetSessionResponse response = await UnaryAsync(
                options => _stub.ResetSessionAsync(request, options), timeout, cancellationToken).ConfigureAwait(false);
            return response.ForgottenTurns;
        }

        /// <summary>The session (or only <paramref name="characterId"/>'s turns in it) as a
        /// self-contained message. NotFound when the sidecar does not hold the session.</summary>
        public Task<SessionState> ExportSessionAsync(
            string sessionId, string characterId = "", TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            var request = new ExportSessionRequest { SessionId = sessionId ?? "", CharacterId = characterId ?? "" };
            return UnaryAsync(options => _stub.ExportSessionAsync(request, options), timeout, cancellationToken);
        }

        /// <summary>The session as protobuf bytes, for a save file; later v1 sidecars read them
        /// back through <see cref="ImportSessionBytesAsync"/>.</summary>
        public async Task<byte[]> ExportSessionBytesAsync(
            string sessionId, string characterId = "", TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            SessionState state = await ExportSessionAsync(sessionId, characterId, timeout, cancellationToken)
                .ConfigureAwait(false);
            return state.ToByteArray();
        }

        /// <summary>Restores a session that <see cref="ExportSessionAsync"/> returned, replacing the
        /// whole session of that id when <paramref name="overwrite"/> is true (the usual choice when
        /// loading a save); with false, AlreadyExists if the sidecar holds one.</summary>
        public Task<ImportSessionResponse> ImportSessionAsync(
            SessionState state, bool overwrite = true, TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            if (state == null)
            {
                throw new ArgumentNullException(nameof(state));
            }
            var request = new ImportSessionRequest { State = state, Overwrite = overwrite };
            return UnaryAsync(options => _stub.ImportSessionAsync(request, options), timeout, cancellationToken);
        }

        /// <summary>Restores a session from the bytes of <see cref="ExportSessionBytesAsync"/>.
        /// Throws <see cref="InvalidProtocolBufferException"/> when they are not a SessionState.</summary>
        public Task<ImportSessionResponse> ImportSessionBytesAsync(
            byte[] saved, bool overwrite = true, TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            if (saved == null)
            {
                throw new ArgumentNullException(nameof(saved));
            }
            return ImportSessionAsync(SessionState.Parser.ParseFrom(saved), overwrite, timeout, cancellationToken);
        }

        // ------------------------------------------------------------------------------------
        // Relationships

        /// <summary>The character's relationship values with the player of this session, each with its
        /// range and tier (start values where none was set).</summary>
        public async Task<IReadOnlyList<Relationship>> GetRelationshipsAsync(
            string sessionId, string characterId, TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            var request = new GetRelationshipsRequest { SessionId = sessionId ?? "", CharacterId = characterId ?? "" };
            RelationshipsResponse response = await UnaryAsync(
                options => _stub.GetRelationshipsAsync(request, options), timeout, cancellationToken)
                .ConfigureAwait(false);
            return new List<Relationship>(response.Relationships);
        }

        /// <summary>Sets one value (InvalidArgument outside its range); the next reply's prompt carries
        /// the new tier. Returns every value after.</summary>
        public Task<IReadOnlyList<Relationship>> SetRelationshipAsync(
            string sessionId, string characterId, string name, long value, TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            SetRelationshipRequest request = RelationshipRequest(sessionId, characterId, name);
            request.Value = value;
            return SetRelationshipAsync(request, timeout, cancellationToken);
        }

        /// <summary>Moves one value by <paramref name="delta"/>, clamped to its range.</summary>
        public Task<IReadOnlyList<Relationship>> ChangeRelationshipAsync(
            string sessionId, string characterId, string name, long delta, TimeSpan? timeout = null,
            CancellationToken cancellationToken = default)
        {
            SetRelationshipRequest request = RelationshipRequest(sessionId, characterId, name);
            request.Delta = delta;
            return SetRelationshipAsync(request, timeout, cancellationToken);
        }

        private static SetRelationshipRequest RelationshipRequest(string sessionId, string characterId, string name)
        {
            return new SetRelationshipRequest
            {
                SessionId = sessionId ?? "", CharacterId = characterId ?? "", Name = name ?? "",
            };
        }

        private async Task<IReadOnlyList<Relationship>> SetRelationshipAsync(
            SetRelationshipRequest request, TimeSpan? timeout, CancellationToken cancellationToken)
        {
            RelationshipsResponse response = await UnaryAsync(
                options => _stub.SetRelationshipAsync(request, options), timeout, cancellationToken)
                .ConfigureAwait(false);
            return new List<Relationship>(response.Relationships);
        }

        // ------------------------------------------------------------------------------------

        private async Task<TResponse> UnaryAsync<TResponse>(
            Func<CallOptions, AsyncUnaryCall<TResponse>> start, TimeSpan? timeout, CancellationToken cancellationToken)
        {
            cancellationToken.ThrowIfCancellationRequested();
            using AsyncUnaryCall<TResponse> call = start(Options(timeout ?? CallTimeout, cancellationToken));
            try
            {
                return await call.ResponseAsync.ConfigureAwait(false);
            }
            catch (RpcException e) when (e.StatusCode == StatusCode.Cancelled && cancellationToken.IsCancellationRequested)
            {
                throw new OperationCanceledException("The call was cancelled.", e, cancellationToken);
            }
        }

        private CallOptions Options(TimeSpan timeout, CancellationToken cancellationToken)
        {
            DateTime? deadline = null;
            if (timeout != Timeout.InfiniteTimeSpan)
            {
                if (timeout < TimeSpan.Zero)
                {
                    throw new ArgumentOutOfRangeException(nameof(timeout), timeout, "must be positive or Timeout.InfiniteTimeSpan");
                }
                deadline = DateTime.UtcNow + timeout; // gRPC deadlines are UTC
            }
            Metadata? headers = null;
            if (_authToken != null)
            {
                headers = new Metadata { { "authorization", "Bearer " + _authToken } };
            }
            return new CallOptions(headers: headers, deadline: deadline, cancellationToken: cancellationToken);
        }
    }

    /// <summary>Helpers to fill a <see cref="TalkRequest"/>'s entities and allowed actions.</summary>
    public static class NpcTalkRequests
    {
        /// <summary>Adds <paramref name="values"/> to the request's entities list
        /// <paramref name="list"/> (creating it, also with no values), e.g.
        /// <c>request.AddEntities("stock", "iron sword", "steel axe")</c>: the values that an action
        /// argument declared <c>from: stock</c> may take in this reply. The sidecar checks the
        /// limits (at most 16 lists named [a-z][a-z0-9_]{0,31}, 64 values each of 1-64 characters)
        /// and answers InvalidArgument beyond them. Returns the request.</summary>
        public static TalkRequest AddEntities(this TalkRequest request, string list, params string[] values)
        {
            return AddEntities(request, list, (IEnumerable<string>)values);
        }

        /// <summary>As <see cref="AddEntities(TalkRequest, string, string[])"/>, from any sequence.</summary>
        public static TalkRequest AddEntities(this TalkRequest request, string list, IEnumerable<string> values)
        {
            if (request == null)
            {
                throw new ArgumentNullException(nameof(request));
            }
            if (!request.Entities.TryGetValue(list, out EntityList entities))
            {
                entities = new EntityList();
                request.Entities[list] = entities;
            }
            if (values != null)
            {
                entities.Values.Add(values);
            }
            return request;
        }

        /// <summary>Allows only these actions in this reply; with no names, none at all. Without a
        /// call every action of the character is allowed (<c>request.AllowedActions = null</c> goes
        /// back to that). A name that is not an action of the character makes the call fail with
        /// InvalidArgument. Returns the request.</summary>
        public static TalkRequest AllowActions(this TalkRequest request, params string[] names)
        {
            if (request == null)
            {
                throw new ArgumentNullException(nameof(request));
            }
            var allowed = new AllowedActions();
            if (names != null)
            {
                allowed.Names.Add(names);
            }
            request.AllowedActions = allowed;
            return request;
        }
    }

    /// <summary>Reading an action (<c>TalkEvent.Action</c>, <c>Finished.Actions</c>).</summary>
    public static class NpcActions
    {
        /// <summary>The action's arguments by name, in their declared order, each value typed:
        /// <c>string</c> for "string" and "enum" arguments, <c>long</c> for "integer", <c>bool</c>
        /// for "boolean" (null for a kind of value this client does not know). For JSON, use
        /// <c>action.ArgumentsJson</c>.</summary>
        public static IReadOnlyDictionary<string, object?> Arguments(Npc.V1.Action action)
        {
            if (action == null)
            {
                throw new ArgumentNullException(nameof(action));
            }
            var arguments = new Dictionary<string, object?>();
            foreach (ActionArgument argument in action.Arguments)
            {
                arguments[argument.Name] = Value(argument);
            }
            return arguments;
        }

        /// <summary>One line for logs and debug text: <c>sell_item(item="iron sword", price=40)</c>.</summary>
        public static string Format(Npc.V1.Action action)
        {
            if (action == null)
            {
                throw new ArgumentNullException(nameof(action));
            }
            var parts = new List<string>();
            foreach (ActionArgument argument in action.Arguments)
            {
                string shown;
                switch (argument.ValueCase)
                {
                    case ActionArgument.ValueOneofCase.StringValue:
                        shown = Quote(argument.StringValue);
                        break;
                    case ActionArgument.ValueOneofCase.IntValue:
                        shown = argument.IntValue.ToString(System.Globalization.CultureInfo.InvariantCulture);
                        break;
                    case ActionArgument.ValueOneofCase.BoolValue:
                        shown = argument.BoolValue ? "true" : "false";
                        break;
                    default:
                        shown = "?";
                        break;
                }
                parts.Add(argument.Name + "=" + shown);
            }
            return action.Name + "(" + string.Join(", ", parts) + ")";
        }

        // A string as JSON writes it: \" \\ \b \f \n \r \t escaped, other control characters as \u00XX.
        private static string Quote(string text)
        {
            var quoted = new System.Text.StringBuilder(text.Length + 2);
            quoted.Append('"');
            foreach (char c in text)
            {
                switch (c)
                {
                    case '"': quoted.Append("\\\""); break;
                    case '\\': quoted.Append("\\\\"); break;
                    case '\b': quoted.Append("\\b"); break;
                    case '\f': quoted.Append("\\f"); break;
                    case '\n': quoted.Append("\\n"); break;
                    case '\r': quoted.Append("\\r"); break;
                    case '\t': quoted.Append("\\t"); break;
                    default:
                        if (c < ' ')
                        {
                            quoted.Append("\\u").Append(((int)c).ToString("x4", System.Globalization.CultureInfo.InvariantCulture));
                        }
                        else
                        {
                            quoted.Append(c);
                        }
                        break;
                }
            }
            return quoted.Append('"').ToString();
        }

        private static object? Value(ActionArgument argument)
        {
            switch (argument.ValueCase)
            {
                case ActionArgument.ValueOneofCase.StringValue: return argument.StringValue;
                case ActionArgument.ValueOneofCase.IntValue: return argument.IntValue;
                case ActionArgument.ValueOneofCase.BoolValue: return argument.BoolValue;
                default: return null;
            }
        }
    }
}
