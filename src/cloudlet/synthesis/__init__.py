"""VM synthesis: base VMs, capturing overlays from customized VMs, and base + overlay -> VM.

- :mod:`.base`        base VMs: create, list, delete, export/import, start a VM from one
- :mod:`.capture`     ``overlay create``: pause a VM and diff it against its base
- :mod:`.synthesize`  stream an overlay (file or URL), rebuild the VM, resume it
"""
