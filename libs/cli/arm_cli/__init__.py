"""`arm`, the operators' command line: contexts (`arm login`, `arm context`), governance for
approvers (`arm approvals`, `arm check`), the audit trail (`arm audit`). Built on the SDK's
connection layer (`arm_client`); see README.md, section "Terminal"."""
