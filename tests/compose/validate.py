"""Checks Compose files against the Compose Specification's JSON schema (vendored here as
compose-spec.json). Usage: validate.py FILE...; prints one line per file, exits 1 if any
file does not conform."""

import json
import sys
from pathlib import Path

import jsonschema
import yaml

SCHEMA = Path(__file__).with_name("compose-spec.json")


def main(paths):
    schema = json.loads(SCHEMA.read_text())
    # The schema declares draft-07 by an address jsonschema does not recognise.
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    failed = 0
    for path in paths:
        document = yaml.safe_load(Path(path).read_text())
        errors = sorted(validator.iter_errors(document), key=lambda e: list(e.absolute_path))
        if errors:
            failed += 1
            print(f"{path}: does not conform to the Compose Specification")
            for error in errors:
                where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
                print(f"  {where}: {error.message}")
        else:
            print(f"{path}: conforms to the Compose Specification")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
