from prunekit.cli import main

main(prog_name="prunekit")
