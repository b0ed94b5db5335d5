"""The teacher cache: sharded safetensors of top-k log-probs plus a self-describing manifest."""
