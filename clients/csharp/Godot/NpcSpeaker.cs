// Godot 4 (.NET): an NPC that answers a player line by streaming its reply into a Label.
//
// Setup: add a Node to the NPC's scene, attach this script, set Reply Label (and optionally
// Emotion Label) in the inspector, and Character Id to the character's folder name under the
// sidecar's characters/. Call Say("...") from a signal (e.g. a LineEdit's text_submitted) or
// `await SayAsync("...")` from your own C# code. Connect to emotion_shown (the reply's emotion,
// before its text) for animation or voice, to action_taken (each action the NPC takes, after the
// text: its name and arguments as JSON) to carry it out, and to reply_finished.
//
// Actions take their arguments from the game's lists: fill Entities (e.g. Entities["stock"] = the
// shop's item names) before Say. Restrict Actions and Allowed Action Names limit which actions this
// NPC may take now.
//
// Threading: nothing here blocks the frame. SayAsync runs on the main thread; every `await`
// (each streamed piece) resumes on the main thread through Godot's SynchronizationContext, so it
// may touch the scene tree, while the network runs on other threads.
//
// Cancelling: leaving the scene tree (_ExitTree) cancels the reply in progress (so does a new Say,
// and StopSpeaking): the sidecar stops generating it and does not add the turn to the session.
//
// Requires the NuGet packages Grpc.Net.Client and Google.Protobuf in the game's .csproj, and
// Generated/*.cs and NpcDialogueClient.cs from clients/csharp (see README.md).

using System;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Godot;
using Grpc.Core;
using Grpc.Net.Client;
using Npc.V1;

namespace Npc.Client
{
    public partial class NpcSpeaker : Node
    {
        /// <summary>The sidecar's address; plaintext HTTP/2, so keep the http:// scheme.</summary>
        [Export] public string Address { get; set; } = "http://127.0.0.1:50051";

        /// <summary>The sidecar's --auth-token; empty when it runs without one.</summary>
        [Export] public string AuthToken { get; set; } = "";

        /// <summary>The character's id: its folder name under the sidecar's characters/.</summary>
        [Export] public string CharacterId { get; set; } = "blacksmith";

        /// <summary>The conversation memory, e.g. one per save slot and player. Empty: no memory.</summary>
        [Export] public string SessionId { get; set; } = "slot1/player";

        /// <summary>How the NPC calls the player. Empty: the NPC is not told a name.</summary>
        [Export] public string PlayerName { get; set; } = "";

        /// <summary>Deadline of one whole reply, in seconds; 0 for none.</summary>
        [Export] public double TalkTimeoutSeconds { get; set; } = 120;

        /// <summary>Where the reply appears, piece by piece.</summary>
        [Export] public Label ReplyLabel { get; set; }

        /// <summary>Optional: where the reply's emotion appears (before its text).</summary>
        [Export] public Label EmotionLabel { get; set; }

        /// <summary>On: only the actions in Allowed Action Names (none when it is empty); off: every
        /// action of the character.</summary>
        [Export] public bool RestrictActions { get; set; }

        /// <summary>The actions allowed when Restrict Actions is on.</summary>
        [Export] public string[] AllowedActionNames { get; set; } = new string[0];

        /// <summary>The game's lists sent with every line (TalkRequest.entities), e.g.
        /// <c>Entities["stock"] = new List&lt;string&gt; { "iron sword", "hammer" }</c>: the values an
        /// action argument declared <c>from: stock</c> may take.</summary>
        public Dictionary<string, List<string>> Entities { get; } = new Dictionary<string, List<string>>();

        /// <summary>Emitted with the reply's emotion (one of the character's), before its text.</summary>
        [Signal] public delegate void EmotionShownEventHandler(string emotion);

        /// <summary>Emitted for each action the NPC takes, after the reply's text: the action's name
        /// and its arguments as a JSON object (parse with Godot's Json.ParseString).</summary>
        [Signal] public delegate void ActionTakenEventHandler(string name, string argumentsJson);

        /// <summary>Emitted when a reply has ended normally.</summary>
        [Signal] public delegate void ReplyFinishedEventHandler(string fullText, string emotion);

        /// <summary>Emitted when a reply failed (not when it was cancelled): the gRPC status code
        /// (Grpc.Core.StatusCode as an int) and its one-line detail.</summary>
        [Signal] public delegate void ReplyFailedEventHandler(int statusCode, string detail);

        private CancellationTokenSource _replyCancellation;

        /// <summary>True while a reply is streaming.</summary>
        public bool IsSpeaking => _replyCancellation != null;

        /// <summary>Fire-and-forget form of <see cref="SayAsync"/>, for signals.</summary>
        public async void Say(string playerLine)
        {
            await SayAsync(playerLine);
        }

        /// <summary>
        /// Sends one player line and streams the NPC's reply into Reply Label. Returns the Finished
        /// event (full text, emotion, actions, token counts) or null when the reply was cancelled or failed
        /// (failures are pushed to Godot's errors and emit reply_failed). A reply already
        /// streaming is cancelled first.
        /// </summary>
        /// <param name="world">Facts for this turn only, e.g. {"time_of_day": "night"}.</param>
        public async Task<Finished> SayAsync(string playerLine, IDictionary<string, string> world = null)
        {
            if (ReplyLabel == null)
            {
                GD.PushError($"{Name}: NpcSpeaker needs its Reply Label set.");
                return null;
            }
            StopSpeaking();
            var cancellation = new CancellationTokenSource();
            _replyCancellation = cancellation;

            var request = new TalkRequest
            {
                CharacterId = CharacterId ?? "",
                SessionId = SessionId ?? "",
                PlayerLine = playerLine ?? "",
                PlayerName = PlayerName ?? "",
            };
            if (world != null)
            {
                request.World.Add(world);
            }
            foreach (KeyValuePair<string, List<string>> list in Entities)
            {
                request.AddEntities(list.Key, list.Value);
            }
            if (RestrictActions)
            {
                request.AllowActions(AllowedActionNames ?? new string[0]);
            }

            var reply = new StringBuilder();
            bool emotionShown = false;
            ReplyLabel.Text = "";
            if (EmotionLabel != null)
            {
                EmotionLabel.Text = "";
            }
            Finished finished = null;
            try
            {
                NpcDialogueClient client = SharedClient(Address, AuthToken);
                TimeSpan timeout = TalkTimeoutSeconds > 0 ? TimeSpan.FromSeconds(TalkTimeoutSeconds) : Timeout.InfiniteTimeSpan;
                // Read to the end of the stream (after Finished comes the call's OK status):
                // leaving the loop early would cancel the call.
                await foreach (TalkEvent talkEvent in client.TalkAsync(request, timeout, cancellation.Token))
                {
                    // A piece that arrived just before a cancellation must not overwrite the next reply.
                    cancellation.Token.ThrowIfCancellationRequested();
                    switch (talkEvent.EventCase)
                    {
                        case TalkEvent.EventOneofCase.Emotion:
                            ShowEmotion(talkEvent.Emotion.Label);
                            emotionShown = true;
                            break;
                        case TalkEvent.EventOneofCase.Delta:
                            reply.Append(talkEvent.Delta.Text);
                            ReplyLabel.Text = reply.ToString();
                            break;
                        case TalkEvent.EventOneofCase.Action:
                            EmitSignal(SignalName.ActionTaken, talkEvent.Action.Name, talkEvent.Action.ArgumentsJson);
                            break;
                        case TalkEvent.EventOneofCase.Finished:
                            finished = talkEvent.Finished;
                            break;
                    }
                }
            }
            catch (OperationCanceledException) when (cancellation.IsCancellationRequested)
            {
                return null; // left the tree, interrupted by a new line, or StopSpeaking
            }
            catch (RpcException e)
            {
                GD.PushWarning($"{Name}: NPC '{CharacterId}' could not answer: {e.StatusCode}: {e.Status.Detail}");
                EmitSignal(SignalName.ReplyFailed, (int)e.StatusCode, e.Status.Detail);
                return null;
            }
            finally
            {
                if (_replyCancellation == cancellation)
                {
                    _replyCancellation = null;
                }
                cancellation.Dispose();
            }

            if (finished != null)
            {
                if (!emotionShown)
                {
                    ShowEmotion(finished.Emotion); // a sidecar older than the emotion event sends it only here
                }
                EmitSignal(SignalName.ReplyFinished, finished.FullText, finished.Emotion);
            }
            return finished;
        }

        private void ShowEmotion(string emotion)
        {
            // Empty when the character declares no emotions.
            if (string.IsNullOrEmpty(emotion))
            {
                return;
            }
            if (EmotionLabel != null)
            {
                EmotionLabel.Text = emotion;
            }
            EmitSignal(SignalName.EmotionShown, emotion);
        }

        /// <summary>Cancels the reply in progress, if any; the text shown so far stays.</summary>
        public void StopSpeaking()
        {
            CancellationTokenSource cancellation = _replyCancellation;
            if (cancellation == null)
            {
                return;
            }
            _replyCancellation = null;
            cancellation.Cancel();
        }

        public override void _ExitTree()
        {
            StopSpeaking();
        }

        // One channel (one HTTP/2 connection) per address and token, shared by every NpcSpeaker
        // and kept for the life of the game: channels are meant to be long-lived.
        private static readonly Dictionary<string, NpcDialogueClient> Clients = new Dictionary<string, NpcDialogueClient>();

        private static NpcDialogueClient SharedClient(string address, string authToken)
        {
            string key = address + "\n" + authToken;
            lock (Clients)
            {
                if (!Clients.TryGetValue(key, out NpcDialogueClient client))
                {
                    // .NET's own SocketsHttpHandler speaks HTTP/2 without TLS to an http:// address.
                    GrpcChannel channel = GrpcChannel.ForAddress(address);
                    client = new NpcDialogueClient(channel, string.IsNullOrEmpty(authToken) ? null : authToken);
                    Clients[key] = client;
                }
                return client;
            }
        }
    }
}
