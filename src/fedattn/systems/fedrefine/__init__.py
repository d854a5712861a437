"""FedRefine: heterogeneous models help a receiver by sending their KV caches (Cache-to-Cache fusion)."""
