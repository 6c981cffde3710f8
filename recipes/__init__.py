"""The recipes shipped with cnnreg (installed as ``cnnreg.recipes``): ``cnnreg recipes``
lists them, ``cnnreg run NAME`` runs one, ``cnnreg cp NAME`` copies one to edit."""
