"""The `seqpar` command line: the front door. Nothing else in the package imports it.

    seqpar generate --sp 2 --prompt "The capital of France is" --max-tokens 16
    seqpar serve --sp 2 --port 8000 [--api-key KEY]    # an OpenAI-compatible server
    torchrun --nproc-per-node 2 -m seqpar generate --sp 2 --prompt ...   # one rank per process
    seqpar bench attention [...]      seqpar bench engine [...]      seqpar bench auto [...]
    seqpar tune                       # measure this machine for --strategy auto
    seqpar plan [...]                 # predict layouts of a cluster
    seqpar demo [--sp 2]

The entry point is `seqpar.cli.main.main`. One module per command (`generate`, `serve`,
`demo`, `bench`), the parser and dispatch in `main`, one torchrun bootstrap in `torchrun`.
The engine's flags are generated from `EngineConfig` by `seqpar.engine.args`.
Bad input exits 2 with one `seqpar: error:` line.
"""
