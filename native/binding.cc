// The only Node-API file: argument unpacking, buffers in place, AsyncWorkers.
// Everything it calls lives in native/core and knows nothing of Node.
#include <napi.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "core/capture_engine.h"
#include "core/codec.h"
#include "core/copy_engine.h"
#include "core/file_ops.h"
#include "core/l2_walk.h"
#include "core/page_engine.h"
#include "core/write_bench.h"
#include "core/zstd_stream.h"

namespace {

using namespace qcow2img;

// Arguments are checked here, where JavaScript values become C++ ones: an engine never sees a
// negative, fractional or NaN number cast to an unsigned one, nor a typed array of another type.
// (Built with C++ exceptions: a throw here becomes a JavaScript error.)

constexpr double kMaxSafe = 9007199254740992.0;  // 2^53

uint64_t checkedUnsigned(Napi::Env env, Napi::Value value, const char* name, uint64_t max) {
  if (!value.IsNumber()) throw Napi::TypeError::New(env, std::string(name) + " must be a number");
  double d = value.As<Napi::Number>().DoubleValue();
  if (!(d >= 0) || d != std::floor(d) || d > kMaxSafe || d > static_cast<double>(max)) {
    throw Napi::RangeError::New(env, std::string(name) + " must be a whole number from 0 to " +
                                         (max >= static_cast<uint64_t>(kMaxSafe) ? std::string("2^53") : std::to_string(max)));
  }
  return static_cast<uint64_t>(d);
}

// Sizes, offsets and counts (absent: the fallback).
uint64_t unsignedField(const Napi::Object& object, const char* name, uint64_t fallback = 0) {
  Napi::Value value = object.Get(name);
  return value.IsUndefined() ? fallback : checkedUnsigned(object.Env(), value, name, UINT64_MAX);
}

uint32_t uint32Field(const Napi::Object& object, const char* name, uint32_t fallback = 0) {
  Napi::Value value = object.Get(name);
  return value.IsUndefined() ? fallback : static_cast<uint32_t>(checkedUnsigned(object.Env(), value, name, UINT32_MAX));
}

// Descriptors (-1: none), codecs, levels.
int intValue(Napi::Env env, Napi::Value value, const char* name) {
  if (!value.IsNumber()) throw Napi::TypeError::New(env, std::string(name) + " must be a number");
  double d = value.As<Napi::Number>().DoubleValue();
  if (!(d >= INT32_MIN && d <= INT32_MAX) || d != std::floor(d)) {
    throw Napi::RangeError::New(env, std::string(name) + " must be a whole number in the int range");
  }
  return static_cast<int>(d);
}

int intField(const Napi::Object& object, const char* name, int fallback = 0) {
  Napi::Value value = object.Get(name);
  return value.IsUndefined() ? fallback : intValue(object.Env(), value, name);
}

uint64_t unsignedArg(const Napi::CallbackInfo& info, size_t index, const char* name) {
  return checkedUnsigned(info.Env(), info[index], name, UINT64_MAX);
}

int intArg(const Napi::CallbackInfo& info, size_t index, const char* name) {
  return intValue(info.Env(), info[index], name);
}

// A typed array of exactly this type, kept alive (against collection) until the worker completes.
template <typename Array>
Array typedField(const Napi::Object& spec, const char* name, napi_typedarray_type type,
                 std::vector<Napi::ObjectReference>& keep) {
  Napi::Value value = spec.Get(name);
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != type) {
    throw Napi::TypeError::New(spec.Env(), std::string(name) + (type == napi_float64_array ? " must be a Float64Array" : " must be a Uint8Array"));
  }
  keep.push_back(Napi::Persistent(value.As<Napi::Object>()));
  return value.As<Array>();
}

// Every element a whole number from 0 to 2^53 (plans, spans, offsets that become uint64_t).
void checkUnsignedElements(Napi::Env env, const Napi::Float64Array& array, const char* name) {
  const double* data = array.Data();
  for (size_t i = 0; i < array.ElementLength(); i++) {
    if (!(data[i] >= 0) || data[i] != std::floor(data[i]) || data[i] > kMaxSafe) {
      throw Napi::RangeError::New(env, std::string(name) + ": element " + std::to_string(i) + " is not a whole number from 0 to 2^53");
    }
  }
}

// walkL2(table, firstEntry, entryCount, clusterBits, extendedL2, externalDataFile)
//   -> { runs: Float64Array (5 per run), defect: number, defectEntry: number }
// Synchronous: one table is at most 2 MiB and walks in well under a millisecond.
Napi::Value WalkL2(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  if (info.Length() < 6 || !info[0].IsBuffer()) {
    throw Napi::TypeError::New(env, "walkL2(table, firstEntry, entryCount, clusterBits, extendedL2, externalDataFile)");
  }
  auto table = info[0].As<Napi::Buffer<uint8_t>>();
  L2WalkParams params;
  params.table = table.Data();
  uint64_t firstEntry = unsignedArg(info, 1, "firstEntry");
  uint64_t entryCount = unsignedArg(info, 2, "entryCount");
  params.clusterBits = static_cast<uint32_t>(checkedUnsigned(env, info[3], "clusterBits", 21));
  params.extendedL2 = info[4].ToBoolean();
  params.externalDataFile = info[5].ToBoolean();
  uint64_t tableEntries = table.Length() / (params.extendedL2 ? 16 : 8);
  // Compared without multiplying, so no sum or product can wrap past the check.
  if (params.clusterBits < 9 || params.clusterBits > 21 || firstEntry > tableEntries ||
      entryCount > tableEntries - firstEntry) {
    throw Napi::RangeError::New(env, "walkL2: entries outside the table");
  }
  params.firstEntry = firstEntry;
  params.entryCount = entryCount;
  size_t capacity = static_cast<size_t>(entryCount) * (params.extendedL2 ? 32 : 1);
  std::vector<double> runs(capacity * kL2RunFields);
  L2WalkResult result = walkL2(params, runs.data(), capacity);
  auto out = Napi::Float64Array::New(env, result.runCount * kL2RunFields);
  std::copy(runs.begin(), runs.begin() + result.runCount * kL2RunFields, out.Data());
  Napi::Object object = Napi::Object::New(env);
  object.Set("runs", out);
  object.Set("defect", static_cast<double>(result.defect));
  object.Set("defectEntry", static_cast<double>(result.defectEntry));
  if (result.defect != L2Defect::None) object.Set("defectName", l2DefectName(result.defect));
  return object;
}

// A BigUint64Array field used in place by native threads (counters, hashes);
// the reference keeps it alive until the worker completes.
uint64_t* bigUint64Field(const Napi::Object& spec, const char* name, size_t minimumLength,
                         std::vector<Napi::ObjectReference>& keep, size_t* length) {
  Napi::Value value = spec.Get(name);
  if (value.IsUndefined()) return nullptr;
  // Given but unusable is an error: counters ignored would make a job impossible to cancel.
  if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array ||
      value.As<Napi::TypedArray>().ElementLength() < minimumLength) {
    throw Napi::TypeError::New(spec.Env(), std::string(name) + " must be a BigUint64Array of at least " +
                                               std::to_string(minimumLength) + " elements");
  }
  auto array = value.As<Napi::TypedArray>();
  keep.push_back(Napi::Persistent(array.As<Napi::Object>()));
  if (length) *length = array.ElementLength();
  return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(array.ArrayBuffer().Data()) +
                                     array.ByteOffset());
}

Napi::Object copyErrorObject(Napi::Env env, const CopyError& failure) {
  Napi::Error error = Napi::Error::New(env, failure.message);
  Napi::Object object = error.Value();
  object.Set("operation", failure.operation);
  object.Set("errno", failure.errnoValue);
  object.Set("sourceIndex", failure.sourceIndex);
  object.Set("guestOffset", static_cast<double>(failure.guestOffset));
  object.Set("hostOffset", static_cast<double>(failure.hostOffset));
  object.Set("cancelled", failure.cancelled);
  return object;
}

class CopyWorker : public Napi::AsyncWorker {
 public:
  CopyWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:copy"), deferred_(Napi::Promise::Deferred::New(env)) {
    // The plan, memory target and counters are used in place; the references
    // keep their ArrayBuffers alive until the worker completes.
    auto runs = typedField<Napi::Float64Array>(spec, "runs", napi_float64_array, keep_);
    checkUnsignedElements(env, runs, "runs");
    job_.runs = runs.Data();
    job_.runCount = runs.ElementLength() / kPlanRunFields;
    Napi::Value sourcesValue = spec.Get("sources");
    if (!sourcesValue.IsArray()) throw Napi::TypeError::New(env, "sources must be an array");
    auto sources = sourcesValue.As<Napi::Array>();
    for (uint32_t i = 0; i < sources.Length(); i++) {
      Napi::Value entry = sources.Get(i);
      if (!entry.IsObject()) throw Napi::TypeError::New(env, "sources must hold objects");
      Napi::Object s = entry.As<Napi::Object>();
      job_.sources.push_back(Source{intField(s, "fd", -1),
                                    unsignedField(s, "size"),
                                    static_cast<Codec>(intField(s, "codec", static_cast<int>(Codec::Deflate))),
                                    unsignedField(s, "clusterSize", 65536),
                                    unsignedField(s, "base")});
    }
    job_.targetFd = intField(spec, "targetFd", -1);
    job_.targetTailFd = intField(spec, "targetTailFd", -1);
    // A memory target is written by worker threads: it must not be transferred (detached)
    // before the promise settles. Image.read documents this for its callers.
    Napi::Value memory = spec.Get("memory");
    if (!memory.IsUndefined() && !memory.IsBuffer()) throw Napi::TypeError::New(env, "memory must be a Buffer");
    if (memory.IsBuffer()) {
      auto buffer = memory.As<Napi::Buffer<uint8_t>>();
      keep_.push_back(Napi::Persistent(buffer.As<Napi::Object>()));
      job_.memory = buffer.Data();
      job_.memoryLength = buffer.Length();
      job_.memoryGuestOffset = unsignedField(spec, "memoryGuestOffset");
    }
    job_.targetBase = unsignedField(spec, "targetBase");
    job_.limitStart = unsignedField(spec, "limitStart");
    job_.limitEnd = unsignedField(spec, "limitEnd");
    job_.alignment = uint32Field(spec, "alignment");
    job_.zeroMode = static_cast<ZeroMode>(intField(spec, "zeroMode"));
    job_.threads = uint32Field(spec, "threads", 4);
    job_.windowSize = unsignedField(spec, "windowSize", 1 << 20);
    job_.counters = reinterpret_cast<CopyCounters*>(bigUint64Field(spec, "counters", 4, keep_, nullptr));
    size_t hashWords = 0;
    job_.windowHashes = bigUint64Field(spec, "windowHashes", 2, keep_, &hashWords);
    job_.windowHashCount = hashWords / 2;
    job_.hashedSize = unsignedField(spec, "hashedSize");
  }

  Napi::Promise promise() { return deferred_.Promise(); }

  void Execute() override { result_ = runCopyJob(job_); }

  void OnOK() override {
    Napi::Env env = Env();
    if (!result_.failed) {
      deferred_.Resolve(env.Undefined());
      return;
    }
    deferred_.Reject(copyErrorObject(env, result_));
  }

  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  CopyJob job_;
  CopyError result_;
};

Napi::Value Copy(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "copy(job) needs a job object");
  auto* worker = new CopyWorker(info.Env(), info[0].As<Napi::Object>());
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class VerifyWorker : public Napi::AsyncWorker {
 public:
  VerifyWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:verify"), deferred_(Napi::Promise::Deferred::New(env)) {
    job_.fd = intField(spec, "fd", -1);
    job_.base = unsignedField(spec, "base");
    job_.size = unsignedField(spec, "size");
    job_.windowSize = unsignedField(spec, "windowSize", 1 << 20);
    job_.alignment = uint32Field(spec, "alignment");
    job_.threads = uint32Field(spec, "threads", 4);
    size_t hashWords = 0;
    job_.windowHashes = bigUint64Field(spec, "windowHashes", 2, keep_, &hashWords);
    job_.windowHashCount = hashWords / 2;
    job_.counters = reinterpret_cast<CopyCounters*>(bigUint64Field(spec, "counters", 4, keep_, nullptr));
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { result_ = runVerifyJob(job_); }
  void OnOK() override {
    if (result_.error.failed) {
      deferred_.Reject(copyErrorObject(Env(), result_.error));
      return;
    }
    deferred_.Resolve(Napi::Number::New(Env(), static_cast<double>(result_.firstBadWindow)));
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  VerifyJob job_;
  VerifyResult result_;
};

// verify(job) -> Promise<number>: the first window whose bytes differ, or -1.
Napi::Value Verify(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) {
    throw Napi::TypeError::New(info.Env(), "verify(job) needs a job object");
  }
  auto* worker = new VerifyWorker(info.Env(), info[0].As<Napi::Object>());
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class CaptureWorker : public Napi::AsyncWorker {
 public:
  CaptureWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:capture"), deferred_(Napi::Promise::Deferred::New(env)) {
    job_.sourceFd = intField(spec, "sourceFd", -1);
    job_.sourceAlignment = uint32Field(spec, "sourceAlignment");
    job_.sourceSize = unsignedField(spec, "sourceSize");
    job_.guestStart = unsignedField(spec, "guestStart");
    job_.clusterCount = unsignedField(spec, "clusterCount");
    job_.clusterSize = unsignedField(spec, "clusterSize", 65536);
    job_.zeroAsData = spec.Get("zeroAsData").ToBoolean();
    job_.codec = static_cast<Codec>(intField(spec, "codec"));
    job_.level = intField(spec, "level");
    job_.outputFd = intField(spec, "outputFd", -1);
    job_.outputDirectFd = intField(spec, "outputDirectFd", -1);
    job_.outputDirectAlignment = uint32Field(spec, "outputDirectAlignment");
    job_.outputPosition = unsignedField(spec, "outputPosition");
    job_.threads = uint32Field(spec, "threads", 2);
    auto results = typedField<Napi::Float64Array>(spec, "results", napi_float64_array, keep_);
    job_.results = results.Data();
    resultCapacity_ = results.ElementLength() / kCaptureResultFields;
    job_.holes = bytesField(spec, "holes", &holesLength_);
    job_.base = bytesField(spec, "base", &baseLength_);
    job_.counters = reinterpret_cast<CopyCounters*>(bigUint64Field(spec, "counters", 4, keep_, nullptr));
  }

  bool valid() const {
    // A direct read is whole units of the source inside one cluster's room in the buffer.
    bool alignment = job_.sourceAlignment == 0 ||
                     (job_.sourceAlignment <= job_.clusterSize && job_.clusterSize % job_.sourceAlignment == 0);
    return resultCapacity_ >= job_.clusterCount && job_.clusterSize >= 512 && alignment &&
           (!job_.holes || holesLength_ >= job_.clusterCount) &&
           (!job_.base || baseLength_ >= job_.clusterCount * job_.clusterSize);
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { result_ = runCaptureJob(job_); }
  void OnOK() override {
    if (result_.error.failed) {
      deferred_.Reject(copyErrorObject(Env(), result_.error));
      return;
    }
    deferred_.Resolve(Napi::Number::New(Env(), static_cast<double>(result_.outputPosition)));
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  const uint8_t* bytesField(const Napi::Object& spec, const char* name, size_t* length) {
    if (spec.Get(name).IsUndefined()) return nullptr;
    auto array = typedField<Napi::Uint8Array>(spec, name, napi_uint8_array, keep_);
    *length = array.ByteLength();
    return array.Data();
  }

  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  CaptureJob job_;
  CaptureResult result_;
  size_t resultCapacity_ = 0;
  size_t holesLength_ = 0;
  size_t baseLength_ = 0;
};

// capture(job) -> Promise<number>: the output position after the stored bytes.
Napi::Value Capture(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "capture(job) needs a job object");
  auto* worker = new CaptureWorker(info.Env(), info[0].As<Napi::Object>());
  if (!worker->valid()) {
    delete worker;
    throw Napi::RangeError::New(info.Env(), "capture: results, holes or base shorter than the cluster range, or a source alignment that does not divide the cluster size");
  }
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class WriteBenchWorker : public Napi::AsyncWorker {
 public:
  WriteBenchWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:bench"), deferred_(Napi::Promise::Deferred::New(env)) {
    job_.fd = intField(spec, "fd", -1);
    job_.offset = unsignedField(spec, "offset");
    job_.size = unsignedField(spec, "size");
    job_.blockSize = uint32Field(spec, "blockSize", 1 << 20);
    job_.queueDepth = uint32Field(spec, "queueDepth", 16);
    job_.random = spec.Get("random").ToBoolean();
    Napi::Value seconds = spec.Get("seconds");
    if (!seconds.IsUndefined() && !seconds.IsNumber()) throw Napi::TypeError::New(env, "seconds must be a number");
    job_.seconds = seconds.IsUndefined() ? 0 : seconds.As<Napi::Number>().DoubleValue();
    // A duration the native clock holds (larger ones overflow its nanoseconds).
    if (!(job_.seconds >= 0 && job_.seconds <= 1e6)) throw Napi::RangeError::New(env, "seconds must be from 0 to 1000000");
    job_.engine = static_cast<BenchEngine>(intField(spec, "engine"));
    job_.seed = unsignedField(spec, "seed", 1);
    job_.counters = reinterpret_cast<CopyCounters*>(bigUint64Field(spec, "counters", 4, keep_, nullptr));
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { result_ = runWriteBench(job_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (result_.error.failed) {
      deferred_.Reject(copyErrorObject(env, result_.error));
      return;
    }
    Napi::Object out = Napi::Object::New(env);
    out.Set("bytes", static_cast<double>(result_.bytes));
    out.Set("writes", static_cast<double>(result_.writes));
    out.Set("seconds", result_.seconds);
    out.Set("p50Us", result_.p50Us);
    out.Set("p99Us", result_.p99Us);
    out.Set("p999Us", result_.p999Us);
    out.Set("engine", result_.engine);
    deferred_.Resolve(out);
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  WriteBenchJob job_;
  WriteBenchResult result_;
};

// writeBench(job) -> Promise<{bytes, writes, seconds, p50Us, p99Us, p999Us, engine}>
Napi::Value WriteBench(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) {
    throw Napi::TypeError::New(info.Env(), "writeBench(job) needs a job object");
  }
  auto* worker = new WriteBenchWorker(info.Env(), info[0].As<Napi::Object>());
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

// A dump's table of first page occurrences, kept across the batches of one dump.
class DedupTableWrap : public Napi::ObjectWrap<DedupTableWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "DedupTable", {InstanceAccessor<&DedupTableWrap::Size>("size")});
  }
  explicit DedupTableWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<DedupTableWrap>(info) {}
  DedupTable table;

 private:
  Napi::Value Size(const Napi::CallbackInfo& info) {
    return Napi::Number::New(info.Env(), static_cast<double>(table.size()));
  }
};


class DumpBatchWorker : public Napi::AsyncWorker {
 public:
  DumpBatchWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:dump"), deferred_(Napi::Promise::Deferred::New(env)) {
    batch_.sourceFd = intField(spec, "sourceFd", -1);
    batch_.dumpOffset = unsignedField(spec, "dumpOffset");
    batch_.firstPage = unsignedField(spec, "firstPage");
    batch_.pageCount = unsignedField(spec, "pageCount");
    batch_.pageSize = uint32Field(spec, "pageSize", 4096);
    batch_.spanPages = uint32Field(spec, "spanPages", 512);
    batch_.firstSpan = unsignedField(spec, "firstSpan");
    batch_.incremental = spec.Get("incremental").ToBoolean();
    batch_.codec = static_cast<Codec>(intField(spec, "codec", static_cast<int>(Codec::Zstd)));
    batch_.level = intField(spec, "level", 1);
    batch_.chunkTargetBytes = unsignedField(spec, "chunkTargetBytes", 1 << 20);
    batch_.threads = uint32Field(spec, "threads", 2);
    // The parent must hold every page of the batch; a product that wraps would let a short one pass.
    if (batch_.pageSize != 0 && batch_.pageCount > UINT64_MAX / batch_.pageSize) invalid_ = true;
    else batch_.parent = bytes(spec, "parent", batch_.pageCount * batch_.pageSize);
    batch_.dirty = bytes(spec, "dirty", (batch_.pageCount + 7) / 8);
    Napi::Value dedup = spec.Get("dedup");
    auto* dedupConstructor = env.GetInstanceData<Napi::FunctionReference>();
    if (dedup.IsObject() && dedupConstructor && dedup.As<Napi::Object>().InstanceOf(dedupConstructor->Value())) {
      keep_.push_back(Napi::Persistent(dedup.As<Napi::Object>()));
      batch_.dedup = &DedupTableWrap::Unwrap(dedup.As<Napi::Object>())->table;
    }
  }
  bool valid() const {
    // A chunk's raw length is a uint32: a span and a chunk target well under 4 GiB keep it so.
    return batch_.pageSize >= 512 && batch_.spanPages > 0 && !invalid_ &&
           static_cast<uint64_t>(batch_.pageSize) * batch_.spanPages <= (64ULL << 20) &&
           batch_.chunkTargetBytes <= (256ULL << 20) &&
           (!batch_.incremental || batch_.parent || batch_.dirty);
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { result_ = processDumpBatch(batch_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (!result_.error.empty()) {
      deferred_.Reject(Napi::Error::New(env, result_.error).Value());
      return;
    }
    Napi::Object out = Napi::Object::New(env);
    auto states = Napi::Uint8Array::New(env, result_.states.size());
    std::copy(result_.states.begin(), result_.states.end(), states.Data());
    out.Set("states", states);
    auto duplicates = Napi::Float64Array::New(env, result_.duplicates.size());
    for (size_t i = 0; i < result_.duplicates.size(); i++) duplicates[i] = static_cast<double>(result_.duplicates[i]);
    out.Set("duplicates", duplicates);
    Napi::Array chunks = Napi::Array::New(env, result_.chunks.size());
    for (size_t i = 0; i < result_.chunks.size(); i++) {
      DumpChunk& c = result_.chunks[i];
      Napi::Object chunk = Napi::Object::New(env);
      chunk.Set("firstSpan", static_cast<double>(c.firstSpan));
      chunk.Set("spanCount", c.spanCount);
      chunk.Set("rawLength", c.rawLength);
      chunk.Set("rawChecksum", Napi::BigInt::New(env, c.rawChecksum));
      chunk.Set("codec", static_cast<int>(c.codec));
      // The compressed bytes move to JavaScript without a copy.
      auto* stored = new std::vector<uint8_t>(std::move(c.stored));
      chunk.Set("stored", Napi::Buffer<uint8_t>::New(env, stored->data(), stored->size(),
                                                      [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; },
                                                      stored));
      chunks[i] = chunk;
    }
    out.Set("chunks", chunks);
    deferred_.Resolve(out);
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  const uint8_t* bytes(const Napi::Object& spec, const char* name, uint64_t needed) {
    if (spec.Get(name).IsUndefined()) return nullptr;
    auto array = typedField<Napi::Uint8Array>(spec, name, napi_uint8_array, keep_);
    if (array.ByteLength() < needed) {
      invalid_ = true;
      return nullptr;
    }
    return array.Data();
  }
  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  DumpBatch batch_;
  DumpBatchResult result_;
  bool invalid_ = false;
};

Napi::Value ProcessDumpBatch(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "processDumpBatch(spec)");
  auto* worker = new DumpBatchWorker(info.Env(), info[0].As<Napi::Object>());
  if (!worker->valid()) {
    delete worker;
    throw Napi::RangeError::New(info.Env(), "processDumpBatch: inconsistent batch (sizes, parent or dirty bitmap)");
  }
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class RestoreBatchWorker : public Napi::AsyncWorker {
 public:
  RestoreBatchWorker(Napi::Env env, const Napi::Object& spec)
      : Napi::AsyncWorker(env, "qcow2img:restore"), deferred_(Napi::Promise::Deferred::New(env)) {
    batch_.stateFd = intField(spec, "stateFd", -1);
    batch_.outputFd = intField(spec, "outputFd", -1);
    batch_.pageSize = uint32Field(spec, "pageSize", 4096);
    batch_.spanPages = uint32Field(spec, "spanPages", 512);
    batch_.firstSpan = unsignedField(spec, "firstSpan");
    batch_.punchZeros = spec.Get("punchZeros").ToBoolean();
    batch_.startWriteback = spec.Get("startWriteback").ToBoolean();
    batch_.threads = uint32Field(spec, "threads", 2);
    auto spans = typedField<Napi::Float64Array>(spec, "spans", napi_float64_array, keep_);  // pairs: page count, dump offset
    checkUnsignedElements(env, spans, "spans");
    for (size_t i = 0; i + 1 < spans.ElementLength(); i += 2) {
      if (spans[i] > UINT32_MAX) throw Napi::RangeError::New(env, "spans: a page count over 2^32");
      batch_.spanPageCounts.push_back(static_cast<uint32_t>(spans[i]));
      batch_.spanDumpOffsets.push_back(static_cast<uint64_t>(spans[i + 1]));
    }
    auto states = typedField<Napi::Uint8Array>(spec, "states", napi_uint8_array, keep_);
    batch_.states = states.Data();
    statesLength_ = states.ElementLength();
    auto chunks = typedField<Napi::Float64Array>(spec, "chunks", napi_float64_array, keep_);  // payload offset, length, checksum as two u32
    checkUnsignedElements(env, chunks, "chunks");
    for (size_t i = 0; i + 3 < chunks.ElementLength(); i += 4) {
      uint64_t checksum = (static_cast<uint64_t>(chunks[i + 2]) << 32) | static_cast<uint64_t>(chunks[i + 3]);
      batch_.chunks.push_back(RestoreChunk{static_cast<uint64_t>(chunks[i]), static_cast<uint64_t>(chunks[i + 1]), checksum});
    }
    auto duplicates = typedField<Napi::Float64Array>(spec, "duplicates", napi_float64_array, keep_);
    checkUnsignedElements(env, duplicates, "duplicates");
    for (size_t i = 0; i < duplicates.ElementLength(); i++) batch_.duplicates.push_back(static_cast<uint64_t>(duplicates[i]));
  }
  bool valid() const {
    size_t pages = 0;
    for (uint32_t n : batch_.spanPageCounts) pages += n;
    return pages <= statesLength_ && batch_.pageSize >= 512 && batch_.spanPages > 0;
  }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { result_ = restoreBatch(batch_); }
  void OnOK() override {
    Napi::Env env = Env();
    if (!result_.error.empty()) {
      Napi::Error error = Napi::Error::New(env, result_.error);
      error.Set("badChunk", Napi::Number::New(env, static_cast<double>(result_.badChunk)));
      deferred_.Reject(error.Value());
      return;
    }
    deferred_.Resolve(Napi::Number::New(env, static_cast<double>(result_.dataBytes)));
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> keep_;
  RestoreBatch batch_;
  RestoreBatchResult result_;
  size_t statesLength_ = 0;
};

Napi::Value RestoreBatchFn(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) throw Napi::TypeError::New(info.Env(), "restoreBatch(spec)");
  auto* worker = new RestoreBatchWorker(info.Env(), info[0].As<Napi::Object>());
  if (!worker->valid()) {
    delete worker;
    throw Napi::RangeError::New(info.Env(), "restoreBatch: states shorter than the spans");
  }
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class DecompressChunkWorker : public Napi::AsyncWorker {
 public:
  DecompressChunkWorker(Napi::Env env, int codec, Napi::Buffer<uint8_t> stored, size_t rawLength)
      : Napi::AsyncWorker(env, "qcow2img:chunk"), deferred_(Napi::Promise::Deferred::New(env)),
        codec_(static_cast<Codec>(codec)), stored_(Napi::Persistent(stored)), data_(stored.Data()),
        length_(stored.Length()), output_(new std::vector<uint8_t>(rawLength)) {}
  ~DecompressChunkWorker() override { delete output_; }
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { ok_ = decompressChunk(codec_, data_, length_, output_->data(), output_->size()); }
  void OnOK() override {
    if (!ok_) {
      deferred_.Reject(Napi::Error::New(Env(), "chunk does not decompress to its length").Value());
      return;
    }
    std::vector<uint8_t>* out = output_;
    output_ = nullptr;
    deferred_.Resolve(Napi::Buffer<uint8_t>::New(Env(), out->data(), out->size(),
                                                 [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, out));
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  Codec codec_;
  Napi::Reference<Napi::Buffer<uint8_t>> stored_;
  const uint8_t* data_;
  size_t length_;
  std::vector<uint8_t>* output_;
  bool ok_ = false;
};

// decompressChunk(codec, stored, rawLength) -> Promise<Buffer>
Napi::Value DecompressChunkFn(const Napi::CallbackInfo& info) {
  if (info.Length() < 3 || !info[1].IsBuffer()) throw Napi::TypeError::New(info.Env(), "decompressChunk(codec, stored, rawLength)");
  uint64_t rawLength = unsignedArg(info, 2, "rawLength");
  if (rawLength > (1u << 30)) throw Napi::RangeError::New(info.Env(), "decompressChunk: raw length out of range");
  int codec = intArg(info, 0, "codec");
  auto* worker = new DecompressChunkWorker(info.Env(), codec, info[1].As<Napi::Buffer<uint8_t>>(), static_cast<size_t>(rawLength));
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

class HashFileWorker : public Napi::AsyncWorker {
 public:
  HashFileWorker(Napi::Env env, int fd, uint64_t offset, uint64_t length)
      : Napi::AsyncWorker(env, "qcow2img:hash"), deferred_(Napi::Promise::Deferred::New(env)), fd_(fd),
        offset_(offset), length_(length) {}
  Napi::Promise promise() { return deferred_.Promise(); }
  void Execute() override { ok_ = hashFile(fd_, offset_, length_, &hash_); }
  void OnOK() override {
    if (!ok_) deferred_.Reject(Napi::Error::New(Env(), "read error while hashing").Value());
    else deferred_.Resolve(Napi::BigInt::New(Env(), hash_));
  }
  void OnError(const Napi::Error& error) override { deferred_.Reject(error.Value()); }

 private:
  Napi::Promise::Deferred deferred_;
  int fd_;
  uint64_t offset_, length_;
  uint64_t hash_ = 0;
  bool ok_ = false;
};

// hashFile(fd, offset = 0, length = to the end) -> Promise<bigint>: XXH3-64 of those bytes.
Napi::Value HashFileFn(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  uint64_t offset = info.Length() > 1 && !info[1].IsUndefined() ? unsignedArg(info, 1, "offset") : 0;
  uint64_t length = info.Length() > 2 && !info[2].IsUndefined() ? unsignedArg(info, 2, "length") : UINT64_MAX;
  auto* worker = new HashFileWorker(info.Env(), fd, offset, length);
  Napi::Promise promise = worker->promise();
  worker->Queue();
  return promise;
}

// hash64(buffer) -> bigint; hash128(buffer) -> Buffer of 16 bytes (low then high, little-endian)
Napi::Uint8Array bytesArg(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsTypedArray() || info[0].As<Napi::TypedArray>().TypedArrayType() != napi_uint8_array) {
    throw Napi::TypeError::New(info.Env(), "a Uint8Array or Buffer is expected");
  }
  return info[0].As<Napi::Uint8Array>();
}

Napi::Value Hash64(const Napi::CallbackInfo& info) {
  auto buffer = bytesArg(info);
  return Napi::BigInt::New(info.Env(), hash64(buffer.Data(), buffer.ByteLength()));
}

Napi::Value Hash128(const Napi::CallbackInfo& info) {
  auto buffer = bytesArg(info);
  uint64_t low, high;
  hash128(buffer.Data(), buffer.ByteLength(), &low, &high);
  auto out = Napi::Buffer<uint8_t>::New(info.Env(), 16);
  memcpy(out.Data(), &low, 8);
  memcpy(out.Data() + 8, &high, 8);
  return out;
}

// seekData / seekHole(fd, offset) -> the next data or hole at or after offset; -1 past the last (ENXIO).
template <int64_t (*Seek)(int, int64_t)>
Napi::Value SeekFn(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  int64_t offset = static_cast<int64_t>(unsignedArg(info, 1, "offset"));
  int64_t result = Seek(fd, offset);
  if (result < 0 && errno != ENXIO) throw Napi::Error::New(info.Env(), strerror(errno));
  return Napi::Number::New(info.Env(), static_cast<double>(result));
}

Napi::Value BlockDevice(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  BlockDeviceInfo device;
  int err = blockDeviceInfo(fd, &device);
  if (err != 0) {
    Napi::Error error = Napi::Error::New(info.Env(), strerror(err));
    error.Set("errno", Napi::Number::New(info.Env(), err));
    throw error;
  }
  Napi::Object object = Napi::Object::New(info.Env());
  object.Set("sizeBytes", static_cast<double>(device.sizeBytes));
  object.Set("logicalBlockSize", device.logicalBlockSize);
  object.Set("physicalBlockSize", device.physicalBlockSize);
  return object;
}

Napi::Value DirectIoAlignment(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  return Napi::Number::New(info.Env(), directIoAlignment(fd));
}

// lockByte(fd, offset) -> 0 or errno; byteLocked(fd, offset) -> 1, 0 or -errno.
template <int (*Operation)(int, uint64_t)>
Napi::Value ByteLockFn(const Napi::CallbackInfo& info) {
  return Napi::Number::New(info.Env(), Operation(intArg(info, 0, "fd"), unsignedArg(info, 1, "offset")));
}

// allocate / willNeed / dropCache(fd, offset, length) -> 0 or errno.
template <int (*Operation)(int, uint64_t, uint64_t)>
Napi::Value RangeFn(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  uint64_t offset = unsignedArg(info, 1, "offset");
  uint64_t length = unsignedArg(info, 2, "length");
  return Napi::Number::New(info.Env(), Operation(fd, offset, length));
}

// new ZstdStream(compress, level, workers); stream.step(input, output, end)
//   -> Promise<{consumed, produced, finished}>. One step in flight at a time (the
//   JS side awaits each); the step runs on a worker thread, buffers used in place.
class ZstdStreamWrap : public Napi::ObjectWrap<ZstdStreamWrap> {
 public:
  static Napi::Function Define(Napi::Env env) {
    return DefineClass(env, "ZstdStream", {InstanceMethod<&ZstdStreamWrap::Step>("step")});
  }
  explicit ZstdStreamWrap(const Napi::CallbackInfo& info) : Napi::ObjectWrap<ZstdStreamWrap>(info) {
    if (info.Length() < 3) throw Napi::TypeError::New(info.Env(), "new ZstdStream(compress, level, workers)");
    stream_ = std::make_unique<ZstdStream>(info[0].ToBoolean(), intArg(info, 1, "level"), intArg(info, 2, "workers"));
    if (!stream_->initError().empty()) throw Napi::Error::New(info.Env(), "zstd: " + stream_->initError());
  }

 private:
  class StepWorker : public Napi::AsyncWorker {
   public:
    StepWorker(Napi::Env env, ZstdStreamWrap* owner, Napi::Buffer<uint8_t> input, Napi::Buffer<uint8_t> output, bool end)
        : Napi::AsyncWorker(env, "qcow2img:zstd-stream"), deferred_(Napi::Promise::Deferred::New(env)), owner_(owner),
          ownerRef_(Napi::Persistent(owner->Value())), inputRef_(Napi::Persistent(input)),
          outputRef_(Napi::Persistent(output)), input_(input.Data()), inputSize_(input.Length()),
          output_(output.Data()), outputSize_(output.Length()), end_(end) {}
    Napi::Promise promise() { return deferred_.Promise(); }
    void Execute() override { result_ = owner_->stream_->step(input_, inputSize_, output_, outputSize_, end_); }
    void OnOK() override {
      owner_->busy_ = false;
      if (!result_.error.empty()) {
        deferred_.Reject(Napi::Error::New(Env(), "zstd: " + result_.error).Value());
        return;
      }
      Napi::Object object = Napi::Object::New(Env());
      object.Set("consumed", static_cast<double>(result_.consumed));
      object.Set("produced", static_cast<double>(result_.produced));
      object.Set("finished", result_.finished);
      deferred_.Resolve(object);
    }
    void OnError(const Napi::Error& error) override {
      owner_->busy_ = false;
      deferred_.Reject(error.Value());
    }

   private:
    Napi::Promise::Deferred deferred_;
    ZstdStreamWrap* owner_;
    Napi::ObjectReference ownerRef_;
    Napi::Reference<Napi::Buffer<uint8_t>> inputRef_, outputRef_;
    const uint8_t* input_;
    size_t inputSize_;
    uint8_t* output_;
    size_t outputSize_;
    bool end_;
    StreamStep result_;
  };

  Napi::Value Step(const Napi::CallbackInfo& info) {
    if (info.Length() < 3 || !info[0].IsBuffer() || !info[1].IsBuffer()) {
      throw Napi::TypeError::New(info.Env(), "step(input, output, end)");
    }
    if (busy_) throw Napi::Error::New(info.Env(), "ZstdStream: a step is already running");
    busy_ = true;
    auto* worker = new StepWorker(info.Env(), this, info[0].As<Napi::Buffer<uint8_t>>(),
                                  info[1].As<Napi::Buffer<uint8_t>>(), info[2].ToBoolean());
    Napi::Promise promise = worker->promise();
    worker->Queue();
    return promise;
  }

  std::unique_ptr<ZstdStream> stream_;
  bool busy_ = false;
};

// The in-memory enums JavaScript passes numbers of, by name; test/addon-arguments.test.ts holds
// them equal to src/native.ts.
Napi::Object Enums(Napi::Env env) {
  Napi::Object codec = Napi::Object::New(env);
  codec.Set("None", static_cast<int>(Codec::None));
  codec.Set("Deflate", static_cast<int>(Codec::Deflate));
  codec.Set("Zstd", static_cast<int>(Codec::Zstd));
  Napi::Object enums = Napi::Object::New(env);
  enums.Set("Codec", codec);
  return enums;
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("enums", Enums(env));
  exports.Set("walkL2", Napi::Function::New(env, WalkL2, "walkL2"));
  exports.Set("copy", Napi::Function::New(env, Copy, "copy"));
  exports.Set("verify", Napi::Function::New(env, Verify, "verify"));
  exports.Set("capture", Napi::Function::New(env, Capture, "capture"));
  exports.Set("writeBench", Napi::Function::New(env, WriteBench, "writeBench"));
  Napi::Function dedup = DedupTableWrap::Define(env);
  // Per environment (worker threads load the addon again), freed with it.
  env.SetInstanceData<Napi::FunctionReference>(new Napi::FunctionReference(Napi::Persistent(dedup)));
  exports.Set("DedupTable", dedup);
  exports.Set("ZstdStream", ZstdStreamWrap::Define(env));
  exports.Set("processDumpBatch", Napi::Function::New(env, ProcessDumpBatch, "processDumpBatch"));
  exports.Set("restoreBatch", Napi::Function::New(env, RestoreBatchFn, "restoreBatch"));
  exports.Set("decompressChunk", Napi::Function::New(env, DecompressChunkFn, "decompressChunk"));
  exports.Set("hash64", Napi::Function::New(env, Hash64, "hash64"));
  exports.Set("hashFile", Napi::Function::New(env, HashFileFn, "hashFile"));
  exports.Set("hash128", Napi::Function::New(env, Hash128, "hash128"));
  exports.Set("seekData", Napi::Function::New(env, SeekFn<seekData>, "seekData"));
  exports.Set("seekHole", Napi::Function::New(env, SeekFn<seekHole>, "seekHole"));
  exports.Set("blockDeviceInfo", Napi::Function::New(env, BlockDevice, "blockDeviceInfo"));
  exports.Set("allocate", Napi::Function::New(env, RangeFn<allocate>, "allocate"));
  exports.Set("dropCache", Napi::Function::New(env, RangeFn<dropCache>, "dropCache"));
  exports.Set("willNeed", Napi::Function::New(env, RangeFn<willNeed>, "willNeed"));
  exports.Set("lockByte", Napi::Function::New(env, ByteLockFn<lockByte>, "lockByte"));
  exports.Set("byteLocked", Napi::Function::New(env, ByteLockFn<byteLocked>, "byteLocked"));
  exports.Set("directIoAlignment", Napi::Function::New(env, DirectIoAlignment, "directIoAlignment"));
  return exports;
}

}  // namespace

NODE_API_MODULE(qcow2img, Init)
