"""The one worker kind (a Ray actor per device) and what it holds: replicas, vLLM engine
shards, reallocation, the device world."""
