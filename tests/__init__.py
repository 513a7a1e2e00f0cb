"""kubetune's tests. A package, so that the test cluster imports as ``tests.cluster``."""
