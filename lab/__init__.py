"""A self-contained lab: network namespaces, a real DNS server and real load, for tests and demos."""
