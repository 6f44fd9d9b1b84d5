"""pipo_runtime: embeddable PIPO runtime (numpy + onnxruntime; never imports torch)."""
