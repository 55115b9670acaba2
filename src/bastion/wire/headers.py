"""HTTP header names of Bastion's API that the client and the server both use."""

# The one outer header of an end-to-end encrypted (OHTTP) request besides Authorization:
# the model, which the gateway needs for routing and quotas without opening the request.
MODEL_HEADER = "bastion-model"
