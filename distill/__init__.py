"""distill: move a large reasoning teacher's next-token distribution into a small quantized student.

Core library: the teacher cache format (`distill.cache`), the distillation losses (`distill.losses`),
data loading (`distill.data`), options declared once for the CLI and the run config
(`distill.options`) and metrics. The run configuration itself is orchestration (`distill.pipeline.config`).
"""

__version__ = "0.1.0"
