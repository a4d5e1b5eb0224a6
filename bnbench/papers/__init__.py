"""The papers' published numbers, as data (``<paper>.yaml``), cited by table and section."""
