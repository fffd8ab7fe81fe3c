// A device that provisions through Azure's own Node.js SDKs, unmodified, driven by
// tests/tests/provisioning_node_sdk.rs:
//
//   node azure_provision.js <host> <id scope> <registration id> <key> <Mqtt|MqttWs|Http>
//
// It registers with azure-iot-provisioning-device (symmetric key security client,
// the given transport; the hub's CA comes from NODE_EXTRA_CA_CERTS, as the
// provisioning transports take no CA option), prints the result as one JSON line,
// then connects azure-iot-device over MQTT with the assigned hub and device id,
// prints the twin's desired properties, sends one telemetry message and exits.
// Events: registered, twin, sent, error.

const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const { Mqtt: ProvisioningMqtt, MqttWs: ProvisioningMqttWs } = require('azure-iot-provisioning-device-mqtt');
const { Http: ProvisioningHttp } = require('azure-iot-provisioning-device-http');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');
const { Client, Message } = require('azure-iot-device');
const { Mqtt } = require('azure-iot-device-mqtt');
const fs = require('fs');

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

async function main() {
  const [host, scope, registrationId, key, kind] = process.argv.slice(2);
  const transport =
    kind === 'Http' ? new ProvisioningHttp() : kind === 'MqttWs' ? new ProvisioningMqttWs() : new ProvisioningMqtt();
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const provisioning = ProvisioningDeviceClient.create(host, scope, transport, security);
  provisioning.setProvisioningPayload({ firmware: '1.0' });
  let result;
  try {
    result = await provisioning.register();
  } catch (err) {
    emit('error', { stage: 'register', error: err.name || String(err), message: err.message || String(err) });
    return;
  }
  emit('registered', {
    status: result.status,
    device_id: result.deviceId,
    assigned_hub: result.assignedHub,
    substatus: result.substatus,
  });
  const client = Client.fromConnectionString(
    `HostName=${result.assignedHub};DeviceId=${result.deviceId};SharedAccessKey=${key}`,
    Mqtt
  );
  await client.setOptions({ ca: fs.readFileSync(process.env.NODE_EXTRA_CA_CERTS, 'utf8') });
  await client.open();
  const twin = await client.getTwin();
  emit('twin', { desired: twin.properties.desired });
  const message = new Message(JSON.stringify({ provisioned: registrationId }));
  message.messageId = 'dps-' + registrationId;
  message.contentType = 'application/json';
  message.contentEncoding = 'utf-8';
  await client.sendEvent(message);
  emit('sent', { message_id: message.messageId });
  await client.close();
}

main().then(
  () => process.exit(0),
  (err) => {
    emit('error', { stage: 'device', error: err.name || String(err), message: err.message || String(err) });
    process.exit(1);
  }
);
