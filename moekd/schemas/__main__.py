"""Write the JSON Schema of the store metadata next to the models: `python -m moekd.schemas`."""

import json

from moekd.schemas import JSON_SCHEMA_PATH, json_schema

JSON_SCHEMA_PATH.write_text(json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
print(f"wrote {JSON_SCHEMA_PATH}")
