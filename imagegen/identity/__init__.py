"""Who a character is: the registry, its blob store, reference sets, safeguards and conditioning."""
