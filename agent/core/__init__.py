"""The core process: the policy loop, the pool, the engine wrapper and the spawner."""
