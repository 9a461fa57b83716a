# Sourced (from the repository root): build/typing/embedwarden/* links give the checkout's
# folders their import names (embedwarden.server, .client, .ray, .v1) without installing it.
mkdir -p build/typing/embedwarden
ln -sfn ../../../server build/typing/embedwarden/server
ln -sfn ../../../client build/typing/embedwarden/client
ln -sfn ../../../bulk build/typing/embedwarden/ray
ln -sfn ../../../proto/embedwarden/v1 build/typing/embedwarden/v1
