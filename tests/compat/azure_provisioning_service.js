// Azure's own Node.js provisioning service SDK (azure-iot-provisioning-service),
// unmodified, driven by tests/tests/provisioning_node_sdk.rs:
//
//   node azure_provisioning_service.js <connection string> <group id>
//
// With the `provisioningserviceowner` connection string (`hub connection-string
// --provisioning`; the hub's CA comes from NODE_EXTRA_CA_CERTS) it creates a
// symmetric-key enrollment group, reads it back, lists the groups with a query,
// deletes the group and lists again, printing one JSON line per step.
// Events: created, got, listed, deleted, listed_after, error.

const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

function emit(event, fields) {
  process.stdout.write(JSON.stringify(Object.assign({ event }, fields || {})) + '\n');
}

async function list(client) {
  const query = client.createEnrollmentGroupQuery({ query: '*' }, 100);
  const ids = [];
  while (query.hasMoreResults) {
    const page = await query.next();
    for (const group of page.responseBody) {
      ids.push(group.enrollmentGroupId);
    }
  }
  return ids;
}

async function main() {
  const [connectionString, groupId] = process.argv.slice(2);
  const client = ProvisioningServiceClient.fromConnectionString(connectionString);
  const created = await client.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: groupId,
    attestation: { type: 'symmetricKey', symmetricKey: { primaryKey: '', secondaryKey: '' } },
    provisioningStatus: 'enabled',
    initialTwin: { tags: { from: 'node-service-sdk' }, properties: { desired: { interval: 5 } } },
  });
  emit('created', {
    id: created.responseBody.enrollmentGroupId,
    etag: created.responseBody.etag,
    has_key: Boolean(created.responseBody.attestation.symmetricKey.primaryKey),
  });
  const got = await client.getEnrollmentGroup(groupId);
  emit('got', { id: got.responseBody.enrollmentGroupId, status: got.responseBody.provisioningStatus });
  emit('listed', { ids: await list(client) });
  await client.deleteEnrollmentGroup(groupId);
  emit('deleted', { id: groupId });
  emit('listed_after', { ids: await list(client) });
}

main().then(
  () => process.exit(0),
  (err) => {
    emit('error', { error: err.name || String(err), message: err.message || String(err) });
    process.exit(1);
  }
);
