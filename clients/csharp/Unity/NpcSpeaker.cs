// Unity: an NPC that answers a player line by streaming its reply into a UI text.
//
// Setup: add this component to the NPC (or to its dialogue panel), set Connection to the scene's
// NpcSidecarConnection, Character Id to the character's folder name under the sidecar's
// characters/, and Reply Text to a TextMeshPro text (TMP_Text: both TextMeshProUGUI on a Canvas
// and a world-space TextMeshPro work). Then call Say("...") from a button, an input field's
// OnSubmit, or your dialogue system; or `await SayAsync("...")` from your own async code.
//
// TMP_Text rather than UnityEngine.UI.Text: TextMeshPro ships with every Unity version this client
// supports (com.unity.textmeshpro, part of com.unity.ugui since Unity 6), renders sharply at any
// size, and SetText(StringBuilder) updates the text without a new string per streamed piece. For a
// legacy UI.Text, change the field's type and use `replyText.text = reply.ToString()`.
//
// Threading: nothing here blocks the frame. SayAsync runs on the main thread; every `await`
// (each streamed piece) resumes on the main thread through Unity's SynchronizationContext, so it
// may touch the scene, while the network runs on other threads.
//
// Cancelling: OnDisable and OnDestroy cancel the reply in progress (so does a new Say, and
// StopSpeaking): the sidecar stops generating it and does not add the turn to the session.
//
// Emotion and actions: when the character declares emotions, the reply's emotion arrives before its
// text (Emotion Text, On Emotion); when it declares actions, each action the NPC takes arrives after
// the text (ActionTaken, On Action). Fill Entities with the game's lists that actions take their
// arguments from (e.g. Entities["stock"] = the shop's item names), and set AllowedActionNames (or
// Restrict Actions in the inspector) to limit which actions this NPC may take now.

using System;
using System.Collections.Generic;
using System.Text;
using System.Threading;
using System.Threading.Tasks;
using Grpc.Core;
using Npc.V1;
using TMPro;
using UnityEngine;
using UnityEngine.Events;

namespace Npc.Client
{
    public sealed class NpcSpeaker : MonoBehaviour
    {
        [SerializeField] private NpcSidecarConnection connection;

        [Tooltip("The character's id: its folder name under the sidecar's characters/.")]
        [SerializeField] private string characterId = "blacksmith";

        [Tooltip("The conversation memory, e.g. one per save slot and player. Empty: no memory.")]
        [SerializeField] private string sessionId = "slot1/player";

        [Tooltip("How the NPC calls the player. Empty: the NPC is not told a name.")]
        [SerializeField] private string playerName = "";

        [Tooltip("Where the reply appears, piece by piece.")]
        [SerializeField] private TMP_Text replyText;

        [Tooltip("Optional: where the reply's emotion (one of the character's emotions) appears when it ends.")]
        [SerializeField] private TMP_Text emotionText;

        [Tooltip("Called with the reply's emotion, before its text, e.g. to set an Animator trigger.")]
        [SerializeField] private UnityEvent<string> onEmotion = new UnityEvent<string>();

        [Tooltip("Called for each action the NPC takes, after the text: its name and its arguments as JSON.")]
        [SerializeField] private UnityEvent<string, string> onAction = new UnityEvent<string, string>();

        [Tooltip("Allow only the actions listed below (none when the list is empty); off: every action of the character.")]
        [SerializeField] private bool restrictActions;

        [Tooltip("The actions allowed when Restrict Actions is on.")]
        [SerializeField] private string[] allowedActions = new string[0];

        private CancellationTokenSource replyCancellation;

        /// <summary>The game's lists sent with every line (TalkRequest.entities), e.g.
        /// <c>Entities["stock"] = new List&lt;string&gt; { "iron sword", "hammer" }</c>: the values an
        /// action argument declared <c>from: stock</c> may take.</summary>
        public IDictionary<string, IList<string>> Entities { get; } = new Dictionary<string, IList<string>>();

        /// <summary>The actions this NPC may take in its next replies; null: every action of the
        /// character; empty: none. The inspector's Restrict Actions and list set it too.</summary>
        public string[] AllowedActionNames
        {
            get => restrictActions ? allowedActions ?? new string[0] : null;
            set
            {
                restrictActions = value != null;
                allowedActions = value ?? new string[0];
            }
        }

        /// <summary>Raised on the main thread for each action the NPC takes, after the reply's text
        /// (Npc.V1.Action: name, typed arguments, ArgumentsJson; see NpcActions).</summary>
        public event Action<Npc.V1.Action> ActionTaken;

        /// <summary>Raised on the main thread when a reply has ended normally.</summary>
        public event Action<Finished> ReplyFinished;

        /// <summary>Raised on the main thread when a reply failed (not when it was cancelled).</summary>
        public event Action<RpcException> ReplyFailed;

        /// <summary>True while a reply is streaming.</summary>
        public bool IsSpeaking => replyCancellation != null;

        public string CharacterId { get => characterId; set => characterId = value; }
        public string SessionId { get => sessionId; set => sessionId = value; }

        /// <summary>Fire-and-forget form of <see cref="SayAsync"/>, for UnityEvents (buttons,
        /// input fields). async void: an exception would reach Unity's log, not be lost.</summary>
        public async void Say(string playerLine)
        {
            await SayAsync(playerLine);
        }

        /// <summary>
        /// Sends one player line and streams the NPC's reply into Reply Text. Returns the Finished
        /// event (full text, emotion, actions, token counts) or null when the reply was cancelled or failed
        /// (failures are logged and raise <see cref="ReplyFailed"/>). A reply already streaming is
        /// cancelled first.
        /// </summary>
        /// <param name="world">Facts for this turn only, e.g. {"time_of_day": "night"}.</param>
        public async Task<Finished> SayAsync(string playerLine, IDictionary<string, string> world = null)
        {
            if (connection == null || replyText == null)
            {
                Debug.LogError($"{name}: NpcSpeaker needs its Connection and Reply Text fields set.", this);
                return null;
            }
            StopSpeaking();
            var cancellation = new CancellationTokenSource();
            replyCancellation = cancellation;

            var request = new TalkRequest
            {
                CharacterId = characterId,
                SessionId = sessionId ?? "",
                PlayerLine = playerLine ?? "",
                PlayerName = playerName ?? "",
            };
            if (world != null)
            {
                request.World.Add(world);
            }
            foreach (KeyValuePair<string, IList<string>> list in Entities)
            {
                request.AddEntities(list.Key, list.Value);
            }
            string[] allowed = AllowedActionNames;
            if (allowed != null)
            {
                request.AllowActions(allowed);
            }

            var reply = new StringBuilder();
            bool emotionShown = false;
            replyText.SetText(reply);
            if (emotionText != null)
            {
                emotionText.SetText(string.Empty);
            }
            Finished finished = null;
            try
            {
                // Read to the end of the stream (after Finished comes the call's OK status):
                // leaving the loop early would cancel the call.
                await foreach (TalkEvent talkEvent in connection.Client.TalkAsync(request, cancellation.Token))
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
                            replyText.SetText(reply);
                            break;
                        case TalkEvent.EventOneofCase.Action:
                            onAction.Invoke(talkEvent.Action.Name, talkEvent.Action.ArgumentsJson);
                            ActionTaken?.Invoke(talkEvent.Action);
                            break;
                        case TalkEvent.EventOneofCase.Finished:
                            finished = talkEvent.Finished;
                            break;
                    }
                }
            }
            catch (OperationCanceledException) when (cancellation.IsCancellationRequested)
            {
                return null; // disabled, destroyed, interrupted by a new line, or StopSpeaking
            }
            catch (RpcException e)
            {
                Debug.LogWarning($"{name}: NPC '{characterId}' could not answer: {e.StatusCode}: {e.Status.Detail}", this);
                ReplyFailed?.Invoke(e);
                return null;
            }
            finally
            {
                if (replyCancellation == cancellation)
                {
                    replyCancellation = null;
                }
                cancellation.Dispose();
            }

            if (finished != null)
            {
                if (!emotionShown)
                {
                    ShowEmotion(finished.Emotion); // a sidecar older than the emotion event sends it only here
                }
                ReplyFinished?.Invoke(finished);
            }
            return finished;
        }

        /// <summary>Cancels the reply in progress, if any; the text shown so far stays.</summary>
        public void StopSpeaking()
        {
            CancellationTokenSource cancellation = replyCancellation;
            if (cancellation == null)
            {
                return;
            }
            replyCancellation = null;
            cancellation.Cancel();
        }

        private void ShowEmotion(string emotion)
        {
            // Empty when the character declares no emotions.
            if (string.IsNullOrEmpty(emotion))
            {
                return;
            }
            if (emotionText != null)
            {
                emotionText.SetText(emotion);
            }
            onEmotion.Invoke(emotion);
        }

        private void OnDisable()
        {
            StopSpeaking();
        }

        private void OnDestroy()
        {
            StopSpeaking();
        }
    }
}
