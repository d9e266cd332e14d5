// Unity: one connection to the npc-sidecar, shared by every NpcSpeaker in the scene.
//
// Put it on one GameObject (e.g. "NpcSidecar") and drag that object into each NpcSpeaker's
// Connection field. It opens a Grpc.Net.Client channel over YetAnotherHttpHandler (Unity's own
// HttpClient cannot speak HTTP/2, which gRPC needs) on first use, and closes it in OnDestroy.
// Requires the packages listed in clients/csharp/README.md (Grpc.Net.Client, Google.Protobuf,
// YetAnotherHttpHandler).

using System;
using System.Threading;
using Cysharp.Net.Http;
using Grpc.Net.Client;
using UnityEngine;

namespace Npc.Client
{
    [DisallowMultipleComponent]
    public sealed class NpcSidecarConnection : MonoBehaviour
    {
        [Tooltip("The sidecar's address. Plaintext HTTP/2 (h2c): keep the http:// scheme.")]
        [SerializeField] private string address = "http://127.0.0.1:50051";

        [Tooltip("The sidecar's --auth-token; empty when it runs without one.")]
        [SerializeField] private string authToken = "";

        [Tooltip("Deadline of one whole streamed reply, in seconds; 0 for none.")]
        [SerializeField] private float talkTimeoutSeconds = 120f;

        [Tooltip("Deadline of the other calls (characters, server info, sessions), in seconds; 0 for none.")]
        [SerializeField] private float callTimeoutSeconds = 10f;

        private GrpcChannel channel;
        private NpcDialogueClient client;

        /// <summary>The client; the channel opens on first use (opening connects nothing yet:
        /// the first call does, and fails with StatusCode.Unavailable if the sidecar is not running).</summary>
        public NpcDialogueClient Client
        {
            get
            {
                if (client == null)
                {
                    channel = GrpcChannel.ForAddress(address, new GrpcChannelOptions
                    {
                        // Http2Only: the sidecar speaks HTTP/2 without TLS, so there is no ALPN to
                        // negotiate it; the handler must start with HTTP/2 (prior knowledge).
                        HttpHandler = new YetAnotherHttpHandler { Http2Only = true },
                        DisposeHttpClient = true,
                    });
                    client = new NpcDialogueClient(channel, string.IsNullOrEmpty(authToken) ? null : authToken)
                    {
                        TalkTimeout = Seconds(talkTimeoutSeconds),
                        CallTimeout = Seconds(callTimeoutSeconds),
                    };
                }
                return client;
            }
        }

        private static TimeSpan Seconds(float seconds)
        {
            return seconds > 0f ? TimeSpan.FromSeconds(seconds) : Timeout.InfiniteTimeSpan;
        }

        private void OnDestroy()
        {
            // Calls still running end with StatusCode.Cancelled; NpcSpeaker cancels its own first.
            channel?.Dispose();
            channel = null;
            client = null;
        }
    }
}
