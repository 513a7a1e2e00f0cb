"""End-to-end tests: kubetune against the test cluster of tests/cluster (real API server, fake kubelet)."""
