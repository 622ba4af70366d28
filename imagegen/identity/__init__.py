"""Who a character is: the registry stores, reference sets, safeguards, the identity methods (PuLID,
IP-Adapter) and the provider that gives a renderer each character's conditioning."""
