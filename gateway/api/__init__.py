"""The management API of contract section 6: one module per resource, all JSON over ``/api``."""
