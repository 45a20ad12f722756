"""The provider seam and its HTTP/1.1 client."""
