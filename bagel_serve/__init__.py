"""bagel-serve: the `bagel` command line (bagel_serve.cli) and the service around BAGEL-7B-MoT."""
