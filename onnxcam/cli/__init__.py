"""The ``onnxcam`` command line (click): explain, inspect, rewrite. Entry point: main.main."""
