"""Training platform: job specs, triggers, trainers per framework, HPO, ONNX export."""

__all__: list[str] = []
