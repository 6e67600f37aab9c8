"""The files users hand us: the safetensors reader, opening and checking checkpoints, lazy reads,
writing outputs atomically, input-channel variants and repairs of known damage."""
