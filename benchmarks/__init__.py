"""prunekit's benchmark suite: each module is one benchmark, run from the repository root as
``python -m benchmarks.NAME`` (``benchmarks/README.md`` lists them, with their cost and current
result). ``benchmarks.common`` holds what the scripts share; prunekit itself never imports this
package, and the tests do not either (they run a script as a subprocess where they check one).
"""
