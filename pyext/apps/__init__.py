"""The products built on the library: the multi-stage trainer, the step benchmark, the demos, the CLI.

They use only slimtune's public API (the package's exported names and the public modules
`slimtune.registry`, `slimtune.architectures`, `slimtune.ops`).
"""
