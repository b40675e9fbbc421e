"""Constraints shared by the structured-output tests: a JSON schema with an enum, a bounded
integer, a boolean, a nested object and an array with ``maxItems`` (the issue's list), a regex and
a choice list."""

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"enum": ["toxic", "clean", "spam"]},
        "score": {"type": "integer", "minimum": -5, "maximum": 100},
        "flagged": {"type": "boolean"},
        "meta": {
            "type": "object",
            "properties": {"lang": {"enum": ["en", "fr"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
            "required": ["lang", "n"],
            "additionalProperties": False,
        },
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    },
    "required": ["label", "score", "flagged", "meta", "tags"],
    "additionalProperties": False,
}
REGEX = r"\d{3}-[A-Z]{2}"
CHOICES = ["toxic", "non-toxic", "spam"]
