#!/usr/bin/python3
"""Drive hemd kms serve with Debian's python3-boto3.

Every operation hemd implements and every error class it returns, each
response checked against the KMS service model that botocore ships: no
member the documented shape lacks, every required member, the documented
types and enum values; an error is {"__type", "message"} with a __type
documented for its operation (or common to AWS APIs), with the documented
HTTP status.

Run by TestBoto3 (clients_test.go) with KMS_URL, KMS_REGION, the admin's
and a grants-only host's keys (ADMIN_KEY/ADMIN_SECRET, HOST_KEY/HOST_SECRET,
host name "host-1") and KMS_STATE_DIR. It prints each failed check and
ends with "N checks passed, M failed"; its exit status is 1 on a failure.
"""

import base64
import datetime
import json
import os
import sys
from unittest import mock

import boto3
import botocore
import botocore.auth
from botocore.config import Config
from botocore.exceptions import ClientError

URL = os.environ["KMS_URL"]
REGION = os.environ["KMS_REGION"]
ADMIN = (os.environ["ADMIN_KEY"], os.environ["ADMIN_SECRET"])
HOST = (os.environ["HOST_KEY"], os.environ["HOST_SECRET"])
STATE_DIR = os.environ["KMS_STATE_DIR"]

# Errors any AWS JSON API may answer, whatever its operation documents.
COMMON = {
    "AccessDeniedException", "IncompleteSignatureException", "InvalidSignatureException",
    "MissingAuthenticationTokenException", "UnrecognizedClientException", "ValidationException",
}

passed = 0
failed = []
last = {}


def check(ok, what):
    global passed
    if ok:
        passed += 1
    else:
        failed.append(what)
        print("FAIL:", what, flush=True)


def record(response_dict=None, **_):
    last["response"] = response_dict


def client(key=ADMIN, region=REGION, validate=True, **config):
    c = boto3.client(
        "kms", endpoint_url=URL, region_name=region,
        aws_access_key_id=key[0], aws_secret_access_key=key[1],
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, parameter_validation=validate, **config))
    c.meta.events.register("response-received.kms", record)
    return c


# Members the KMS API gained after Debian 12's botocore (1.29) was cut,
# documented in today's AWS KMS API Reference.
NEWER = {"GetKeyRotationStatusResponse": {"KeyId"}}


def conforms(shape, value, path):
    """Problems of value (decoded JSON) against a botocore shape."""
    t = shape.type_name
    if t == "structure":
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not an object ({shape.name})"]
        errs = [f"{path}.{k}: not a member of {shape.name}" for k in value
                if k not in shape.members and k not in NEWER.get(shape.name, ())]
        errs += [f"{path}.{k}: required by {shape.name}, missing" for k in shape.required_members if k not in value]
        for k, v in value.items():
            if k in shape.members:
                errs += conforms(shape.members[k], v, f"{path}.{k}")
        return errs
    if t == "list":
        if not isinstance(value, list):
            return [f"{path}: {value!r} is not a list"]
        return [e for i, v in enumerate(value) for e in conforms(shape.member, v, f"{path}[{i}]")]
    if t == "map":
        if not isinstance(value, dict):
            return [f"{path}: {value!r} is not a map"]
        return [e for k, v in value.items()
                for e in conforms(shape.key, k, f"{path} key") + conforms(shape.value, v, f"{path}.{k}")]
    if t == "string":
        if not isinstance(value, str):
            return [f"{path}: {value!r} is not a string"]
        if shape.enum and value not in shape.enum:
            return [f"{path}: {value!r} is not one of {shape.name}'s values"]
        return []
    if t == "blob":
        try:
            base64.b64decode(value, validate=True)
            return []
        except Exception:
            return [f"{path}: {value!r} is not base64"]
    if t == "timestamp":
        return [] if isinstance(value, (int, float)) and not isinstance(value, bool) else [f"{path}: {value!r} is not epoch seconds"]
    if t == "boolean":
        return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
    if t in ("integer", "long"):
        return [] if isinstance(value, int) and not isinstance(value, bool) else [f"{path}: {value!r} is not an integer"]
    return [f"{path}: shape type {t} not checked"]


def body():
    raw = last["response"]["body"]
    return json.loads(raw) if raw else {}


def ok(c, op, **params):
    """Call op, expect success, check the raw response's shape."""
    last.clear()
    try:
        out = getattr(c, botocore.xform_name(op))(**params)
    except Exception as e:  # noqa: BLE001 - every failure is reported
        check(False, f"{op}({params}): {e}")
        return None
    shape = c.meta.service_model.operation_model(op).output_shape
    raw = body()
    problems = conforms(shape, raw, op) if shape is not None else ([] if raw == {} else [f"{op}: body {raw}, want {{}}"])
    check(not problems, f"{op}: " + "; ".join(problems))
    return out


def err(c, op, code, status=400, **params):
    """Call op, expect the error code with its HTTP status and shape."""
    last.clear()
    try:
        getattr(c, botocore.xform_name(op))(**params)
    except ClientError as e:
        got, st = e.response["Error"]["Code"], e.response["ResponseMetadata"]["HTTPStatusCode"]
        check(got == code and st == status, f"{op}: got {got} (HTTP {st}), want {code} (HTTP {status}): {e}")
        raw = body()
        check(set(raw) == {"__type", "message"} and isinstance(raw["message"], str) and raw["message"],
              f"{op} {code}: error body {raw}")
        documented = {s.name for s in c.meta.service_model.operation_model(op).error_shapes}
        check(code in documented or code in COMMON or (code == "UnsupportedOperationException" and op in NOT_IMPLEMENTED),
              f"{op}: {code} is not documented for it")
        if code in documented:
            check(isinstance(e, getattr(c.exceptions, code)), f"{op}: botocore did not raise its {code} class")
        return
    except Exception as e:  # noqa: BLE001
        check(False, f"{op}: {e!r}, want {code}")
        return
    check(False, f"{op}({params}) succeeded, want {code}")


NOT_IMPLEMENTED = {"GetKeyPolicy", "ListKeyPolicies", "Sign"}

admin = client()
loose = client(validate=False)  # sends what botocore would refuse itself
host = client(HOST)
vol = {"aws:ebs:id": "vol-0123456789abcdef0"}
other = {"aws:ebs:id": "vol-0fedcba9876543210"}

# Keys.
k1 = ok(admin, "CreateKey", Description="boto3", Tags=[{"TagKey": "env", "TagValue": "test"}])["KeyMetadata"]
for field, want in [("KeyManager", "CUSTOMER"), ("KeySpec", "SYMMETRIC_DEFAULT"), ("KeyUsage", "ENCRYPT_DECRYPT"),
                    ("Origin", "AWS_KMS"), ("MultiRegion", False), ("EncryptionAlgorithms", ["SYMMETRIC_DEFAULT"]),
                    ("KeyState", "Enabled"), ("Description", "boto3")]:
    check(k1.get(field) == want, f"CreateKey KeyMetadata.{field} = {k1.get(field)!r}, want {want!r}")
check(k1["Arn"] == f"arn:aws:kms:{REGION}:{k1['AWSAccountId']}:key/{k1['KeyId']}", f"CreateKey Arn {k1['Arn']}")
k2 = ok(admin, "CreateKey")["KeyMetadata"]
ok(admin, "DescribeKey", KeyId=k1["Arn"])
ok(admin, "UpdateKeyDescription", KeyId=k1["KeyId"], Description="renamed")
check(ok(admin, "DescribeKey", KeyId=k1["KeyId"])["KeyMetadata"]["Description"] == "renamed", "UpdateKeyDescription")
page = ok(admin, "ListKeys", Limit=1)
check(len(page["Keys"]) == 1 and page["Truncated"] and page.get("NextMarker"), f"ListKeys Limit=1: {page}")
rest = ok(admin, "ListKeys", Marker=page["NextMarker"])
check(len(rest["Keys"]) == 1 and not rest["Truncated"] and rest["Keys"][0] != page["Keys"][0], f"ListKeys page 2: {rest}")
every = [k["KeyId"] for p in admin.get_paginator("list_keys").paginate(PaginationConfig={"PageSize": 1}) for k in p["Keys"]]
check(sorted(every) == sorted([k1["KeyId"], k2["KeyId"]]), f"ListKeys paginator: {every}")

# Aliases.
ok(admin, "CreateAlias", AliasName="alias/boto3", TargetKeyId=k1["KeyId"])
err(admin, "CreateAlias", "AlreadyExistsException", AliasName="alias/boto3", TargetKeyId=k2["KeyId"])
ok(admin, "UpdateAlias", AliasName="alias/boto3", TargetKeyId=k2["Arn"])
aliases = ok(admin, "ListAliases", KeyId=k2["KeyId"])["Aliases"]
check([a["AliasName"] for a in aliases] == ["alias/boto3"], f"ListAliases after UpdateAlias: {aliases}")
ok(admin, "ListAliases", Limit=1)
ok(admin, "DeleteAlias", AliasName="alias/boto3")
err(admin, "DescribeKey", "NotFoundException", KeyId="alias/boto3")
err(admin, "DeleteAlias", "NotFoundException", AliasName="alias/boto3")

# Tags.
ok(admin, "TagResource", KeyId=k1["KeyId"], Tags=[{"TagKey": "team", "TagValue": "storage"}, {"TagKey": "env", "TagValue": "prod"}])
tags = ok(admin, "ListResourceTags", KeyId=k1["KeyId"])["Tags"]
check(tags == [{"TagKey": "env", "TagValue": "prod"}, {"TagKey": "team", "TagValue": "storage"}], f"ListResourceTags: {tags}")
ok(admin, "UntagResource", KeyId=k1["KeyId"], TagKeys=["team"])
check(ok(admin, "ListResourceTags", KeyId=k1["KeyId"], Limit=1)["Tags"] == [{"TagKey": "env", "TagValue": "prod"}], "UntagResource")
err(admin, "TagResource", "TagException", KeyId=k1["KeyId"], Tags=[{"TagKey": "aws:reserved", "TagValue": "x"}])
err(admin, "TagResource", "LimitExceededException", KeyId=k1["KeyId"],
    Tags=[{"TagKey": f"t{i}", "TagValue": "v"} for i in range(50)])

# Data keys, Encrypt, Decrypt, ReEncrypt.
dk = ok(admin, "GenerateDataKey", KeyId=k1["KeyId"], KeySpec="AES_256", EncryptionContext=vol)
check(len(dk["Plaintext"]) == 32 and dk["KeyId"] == k1["Arn"], "GenerateDataKey")
d = ok(admin, "Decrypt", CiphertextBlob=dk["CiphertextBlob"], EncryptionContext=vol)
check(d["Plaintext"] == dk["Plaintext"] and d["EncryptionAlgorithm"] == "SYMMETRIC_DEFAULT", "Decrypt of GenerateDataKey's blob")
wrapped = ok(admin, "GenerateDataKeyWithoutPlaintext", KeyId=k1["Arn"], NumberOfBytes=64, EncryptionContext=vol)
check(len(ok(admin, "Decrypt", CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=vol)["Plaintext"]) == 64,
      "Decrypt of GenerateDataKeyWithoutPlaintext's blob")
err(admin, "Decrypt", "InvalidCiphertextException", CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=other)
err(admin, "Decrypt", "IncorrectKeyException", CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=vol, KeyId=k2["KeyId"])
big = os.urandom(4096)
enc = ok(admin, "Encrypt", KeyId=k1["KeyId"], Plaintext=big, EncryptionContext=vol)
check(ok(admin, "Decrypt", CiphertextBlob=enc["CiphertextBlob"], EncryptionContext=vol)["Plaintext"] == big, "Decrypt of 4096 bytes")
err(loose, "Encrypt", "ValidationException", KeyId=k1["KeyId"], Plaintext=os.urandom(4097))
err(admin, "Encrypt", "InvalidKeyUsageException", KeyId=k1["KeyId"], Plaintext=b"x", EncryptionAlgorithm="RSAES_OAEP_SHA_256")
re = ok(admin, "ReEncrypt", CiphertextBlob=enc["CiphertextBlob"], SourceEncryptionContext=vol,
        DestinationKeyId=k2["KeyId"], DestinationEncryptionContext=other)
check(re["SourceKeyId"] == k1["Arn"] and re["KeyId"] == k2["Arn"], f"ReEncrypt SourceKeyId/KeyId: {re.get('SourceKeyId')} {re.get('KeyId')}")
check(ok(admin, "Decrypt", CiphertextBlob=re["CiphertextBlob"], EncryptionContext=other)["Plaintext"] == big, "Decrypt after ReEncrypt")
r = ok(admin, "GenerateRandom", NumberOfBytes=64)
check(len(r["Plaintext"]) == 64, "GenerateRandom")
err(loose, "GenerateRandom", "ValidationException", NumberOfBytes=2000)
err(admin, "GenerateRandom", "CustomKeyStoreNotFoundException", NumberOfBytes=8, CustomKeyStoreId="cks-1234567890abcdef0")

# Rotation.
ok(admin, "EnableKeyRotation", KeyId=k1["KeyId"])
check(ok(admin, "GetKeyRotationStatus", KeyId=k1["KeyId"])["KeyRotationEnabled"] is True, "GetKeyRotationStatus")
ok(admin, "DisableKeyRotation", KeyId=k1["KeyId"])
if "rotate_key_on_demand" in dir(admin):  # newer than Debian 12's botocore
    ok(admin, "RotateKeyOnDemand", KeyId=k1["KeyId"])

# Grants: a host that may decrypt one volume's key.
g = ok(admin, "CreateGrant", KeyId=k1["KeyId"], GranteePrincipal="host-1", RetiringPrincipal="host-1",
       Operations=["Decrypt", "RetireGrant"], Constraints={"EncryptionContextEquals": vol})
g2 = ok(admin, "CreateGrant", KeyId=k1["KeyId"], GranteePrincipal="host-2", Operations=["Decrypt"])
grants = ok(admin, "ListGrants", KeyId=k1["KeyId"], Limit=1)
check(len(grants["Grants"]) == 1 and grants["Truncated"], f"ListGrants Limit=1: {grants}")
mine = ok(admin, "ListRetirableGrants", RetiringPrincipal="host-1")["Grants"]
check([x["GrantId"] for x in mine] == [g["GrantId"]], f"ListRetirableGrants: {mine}")
check(ok(host, "Decrypt", CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=vol) is not None, "host Decrypt under its grant")
err(host, "Decrypt", "AccessDeniedException", CiphertextBlob=re["CiphertextBlob"], EncryptionContext=other)
err(host, "CreateKey", "AccessDeniedException")
err(host, "RetireGrant", "InvalidGrantTokenException", GrantToken="not-a-token")
ok(host, "RetireGrant", GrantToken=g["GrantToken"])
err(host, "Decrypt", "AccessDeniedException", CiphertextBlob=wrapped["CiphertextBlob"], EncryptionContext=vol)
err(admin, "RevokeGrant", "InvalidGrantIdException", KeyId=k1["KeyId"], GrantId="not-a-grant-id")
ok(admin, "RevokeGrant", KeyId=k1["KeyId"], GrantId=g2["GrantId"])
check(ok(admin, "ListGrants", KeyId=k1["KeyId"])["Grants"] == [], "ListGrants after retire and revoke")

# Key states.
ok(admin, "DisableKey", KeyId=k2["KeyId"])
err(admin, "Encrypt", "DisabledException", KeyId=k2["KeyId"], Plaintext=b"x")
ok(admin, "EnableKey", KeyId=k2["KeyId"])
sk = ok(admin, "ScheduleKeyDeletion", KeyId=k2["KeyId"], PendingWindowInDays=7)
check(sk["KeyState"] == "PendingDeletion" and sk["PendingWindowInDays"] == 7, f"ScheduleKeyDeletion: {sk}")
err(admin, "Encrypt", "KMSInvalidStateException", KeyId=k2["KeyId"], Plaintext=b"x")
err(loose, "ScheduleKeyDeletion", "ValidationException", KeyId=k1["KeyId"], PendingWindowInDays=3)
ok(admin, "CancelKeyDeletion", KeyId=k2["KeyId"])
check(ok(admin, "DescribeKey", KeyId=k2["KeyId"])["KeyMetadata"]["KeyState"] == "Disabled", "CancelKeyDeletion leaves the key Disabled")

# What hemd does not do.
err(admin, "CreateKey", "UnsupportedOperationException", KeySpec="RSA_2048", KeyUsage="SIGN_VERIFY")
err(admin, "CreateKey", "MalformedPolicyDocumentException", Policy="{}")
err(admin, "GetKeyPolicy", "UnsupportedOperationException", KeyId=k1["KeyId"], PolicyName="default")
err(loose, "ListKeys", "InvalidMarkerException", Marker="!not-a-marker!")
err(loose, "ListKeys", "ValidationException", Limit=0)

# Authentication.
err(client(("AKIDNOBODY", "x")), "ListKeys", "UnrecognizedClientException")
err(client((ADMIN[0], "wrong")), "ListKeys", "InvalidSignatureException")
err(client(region="xx-nowhere-1"), "ListKeys", "InvalidSignatureException")
err(client(signature_version=botocore.UNSIGNED), "ListKeys", "MissingAuthenticationTokenException")


def drop_signed_headers(request, **_):
    auth = request.headers["Authorization"]
    if isinstance(auth, bytes):
        auth = auth.decode()
    request.headers["Authorization"] = auth.replace("SignedHeaders=", "Signed=")


def change_body(request, **_):
    request.body = request.body.replace(b"5", b"6")


for name, hook, code in [("IncompleteSignature", drop_signed_headers, "IncompleteSignatureException"),
                         ("changed body", change_body, "InvalidSignatureException")]:
    c = client()
    c.meta.events.register_first("before-send.kms.ListKeys", hook)
    err(c, "ListKeys", code, Limit=5)


class Stale(datetime.datetime):
    @classmethod
    def utcnow(cls):
        return super(Stale, cls).utcnow() - datetime.timedelta(minutes=10)


with mock.patch.object(botocore.auth.datetime, "datetime", Stale):
    err(client(), "ListKeys", "InvalidSignatureException")

# The KMS's own failure is HTTP 500 (its tag store made unreadable).
tags_file = os.path.join(STATE_DIR, "tags.json")
os.remove(tags_file)
os.mkdir(tags_file)
err(admin, "ListResourceTags", "KMSInternalException", status=500, KeyId=k1["KeyId"])

print(f"boto3 {boto3.__version__} (botocore {botocore.__version__}): {passed} checks passed, {len(failed)} failed")
sys.exit(1 if failed else 0)
