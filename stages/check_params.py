"""Stage check_params: validate the whole of params.yaml before any other stage runs, so a misspelt or
unknown key fails every `dvc repro` (no other stage depends on a key nobody reads). It writes the
schema it checked against, which changes only with the code: the stages after it never rerun for it;
and the environment every stage of this run computes in (nirvana.environment), for the audit."""

from nirvana.environment import reproducible
from nirvana.io import write_json
from nirvana.params import Params, schema
from nirvana.stage import run_stage


def main(params: Params, schema_out: str, environment_out: str) -> None:
    write_json(schema(), schema_out)  # run_stage has validated params.yaml (or stopped) before this
    write_json(reproducible(), environment_out)


if __name__ == "__main__":
    run_stage("check_params", main)
