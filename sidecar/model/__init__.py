"""Math: checkpoints, quantized weights and the Llama forward. Nothing here knows about requests."""
