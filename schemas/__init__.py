"""Every message volumed sends or receives, as msgspec Structs.

The lowest layer: it imports msgspec and the standard library only, so the bus and the
actors can share one vocabulary. Validation lives in the types (constraints name the field
in their error), never in ad-hoc checks scattered over the actors.
"""
