"""OA sampling reports: the file formats (`schema`), batched generation (`generation`), the report builder
(`report`) and its HTML view (`html`). The `sampling-report` stage and `orca8k generate` are thin callers."""
