"""Development tools: not the server, but what a developer runs beside it.

- `local_kafka`: `hiddenstate kafka start|stop|status`, a single-node broker
  from Maven Central (its pom ships in `devtools/kafka/` as package data);
- `local_registry`: `hiddenstate registry start|stop|status`, Apicurio Registry
  (the Confluent Schema Registry API) from Maven Central, pom in `devtools/registry/`;
- `home`: where those servers keep their files (a checkout, or the user's data folder);
- `produce`: `hiddenstate produce`, events onto a topic from a file or the
  synthetic fleet;
- `watch`: `hiddenstate watch`, predictions as they arrive;
- `synthetic`: the synthetic fleet of devices (demos, load and training data).

`hiddenstate serve` imports none of these.
"""
