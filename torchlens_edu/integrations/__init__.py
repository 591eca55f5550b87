"""Front ends that plug into other tools: IPython's %trace_shapes and the pytest plugin."""
