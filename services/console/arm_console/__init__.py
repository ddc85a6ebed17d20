"""The web console: a Starlette application that talks to ARM's services only through their gRPC
contracts, with the signed-in operator's own key (`arm_client`), so RBAC and tenant isolation stay
where the services enforce them."""
