"""Stand-ins for the tiny presets: files in the released formats, names and repository ids, with toy weights.

The tiny presets differ from the real ones only in where their files come from. Real presets fetch their
identity assets with ``imagegen models pull``; tiny presets have :mod:`.build` write stand-ins of the same
assets into their own store (``<model cache>/tiny``), from where the very same loaders, converters and checks
read them. Nothing under ``imagegen/identity`` or ``imagegen/faces`` knows about stand-ins; stand-in face models
are marked in their ONNX metadata so that they never vouch for anything (a report, a cache key, the age gate).

- :mod:`.faces`: ONNX models with insightface's signatures (detector, ArcFace, genderage).
- :mod:`.identity`: seeded state dicts in the released PuLID / EVA-CLIP / IP-Adapter layouts at toy sizes.
- :mod:`.build`: writes them into a store as the publishers released them.

This package sits above the pipelines and identity packages (it reads their module definitions to size the
files); the asset store finds :func:`.build.write_standins` by name, the way diffusers finds component classes.
"""
