"""The checks `aziotctl check` runs, one module per subject, listed in order by `registry`.

Each check is a function `(ctx, info) -> Outcome`: `ctx` carries what earlier checks learned
(parsed configs, which services answer, certs and public keys read through the services), `info`
is the check's own JSON `additional_info`. A check that needs what an earlier one could not
provide returns `skipped`; a `fatal` outcome stops the run.
"""
