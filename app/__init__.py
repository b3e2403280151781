"""The cvxtune HTTP API: routes, schemas, auth and persistence. Tasks are sent by name."""
