# The one version number: pyproject.toml reads it (dynamic version) and so does
# CMakeLists.txt.
__version__ = "0.1.0"
