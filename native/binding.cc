// The only Node-API file: argument unpacking, buffers in place, AsyncWorkers.
// Everything it calls lives in native/core and knows nothing of Node.
#include <napi.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "core/capture_engine.h"
#include "core/codec.h"
#include "core/copy_engine.h"
#include "core/file_ops.h"
#include "core/http_get.h"
#include "core/l2_walk.h"
#include "core/page_engine.h"
#include "core/write_bench.h"
#include "core/zstd_stream.h"

namespace {

using namespace qcow2img;

// Arguments are checked here, where JavaScript values become C++ ones: an engine never sees a
// negative, fractional or NaN number cast to an unsigned one, an enum value it does not define,
// nor a typed array of another type. (Built with C++ exceptions: a throw here becomes a
// JavaScript error.)

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

// Descriptors (-1: none), levels.
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

// The enums whose values JavaScript passes or reads as numbers: each enumerator by name, so a
// number is checked against the values the engine defines (never cast), and the addon exports
// them (`enums`) for test/package/addon-arguments.test.ts to hold equal to src/native.ts.
template <typename E>
struct Enumerator {
  const char* name;
  E value;
};
template <typename E>
struct EnumTable;
template <>
struct EnumTable<Codec> {
  static constexpr const char* kName = "Codec";
  static constexpr Enumerator<Codec> kValues[] = {{"None", Codec::None}, {"Deflate", Codec::Deflate}, {"Zstd", Codec::Zstd}};
};
template <>
struct EnumTable<ZeroMode> {
  static constexpr const char* kName = "ZeroMode";
  static constexpr Enumerator<ZeroMode> kValues[] = {
      {"Skip", ZeroMode::Skip}, {"Write", ZeroMode::Write}, {"ZeroOut", ZeroMode::ZeroOut}, {"PunchHole", ZeroMode::PunchHole}};
};
template <>
struct EnumTable<RunKind> {
  static constexpr const char* kName = "RunKind";
  static constexpr Enumerator<RunKind> kValues[] = {{"Zero", RunKind::Zero}, {"Data", RunKind::Data}, {"Compressed", RunKind::Compressed}};
};
template <>
struct EnumTable<BenchEngine> {
  static constexpr const char* kName = "BenchEngine";
  static constexpr Enumerator<BenchEngine> kValues[] = {
      {"Auto", BenchEngine::Auto}, {"IoUring", BenchEngine::IoUring}, {"Threads", BenchEngine::Threads}};
};
template <>
struct EnumTable<PageState> {
  static constexpr const char* kName = "PageState";
  static constexpr Enumerator<PageState> kValues[] = {
      {"Zero", PageState::Zero}, {"Data", PageState::Data}, {"Duplicate", PageState::Duplicate}, {"Parent", PageState::Parent}};
};
// Output only (walkL2's runs), exported to be compared all the same.
template <>
struct EnumTable<UnitKind> {
  static constexpr const char* kName = "UnitKind";
  static constexpr Enumerator<UnitKind> kValues[] = {{"Unallocated", UnitKind::Unallocated}, {"Zero", UnitKind::Zero},
                                                     {"ZeroAllocated", UnitKind::ZeroAllocated}, {"Data", UnitKind::Data},
                                                     {"Compressed", UnitKind::Compressed}};
};

// False for a number no enumerator has (NaN, fractions and out-of-range values included).
template <typename E>
bool enumFromNumber(double number, E* out) {
  for (const auto& e : EnumTable<E>::kValues) {
    if (static_cast<double>(static_cast<int>(e.value)) == number) {
      *out = e.value;
      return true;
    }
  }
  return false;
}

// "one of 0 (None), 1 (Deflate), 2 (Zstd)"
template <typename E>
std::string enumChoices() {
  std::string out = "one of ";
  for (const auto& e : EnumTable<E>::kValues) {
    if (&e != EnumTable<E>::kValues) out += ", ";
    out += std::to_string(static_cast<int>(e.value)) + " (" + e.name + ")";
  }
  return out;
}

template <typename E>
E enumValue(Napi::Env env, Napi::Value value, const std::string& name) {
  if (!value.IsNumber()) throw Napi::TypeError::New(env, name + " must be a number");
  E out;
  if (!enumFromNumber(value.As<Napi::Number>().DoubleValue(), &out)) {
    throw Napi::RangeError::New(env, name + " must be " + enumChoices<E>());
  }
  return out;
}

template <typename E>
E enumField(const Napi::Object& object, const char* name, E fallback) {
  Napi::Value value = object.Get(name);
  return value.IsUndefined() ? fallback : enumValue<E>(object.Env(), value, name);
}

template <typename... E>
Napi::Object enumsObject(Napi::Env env) {
  Napi::Object enums = Napi::Object::New(env);
  auto add = [&](const char* name, auto& values) {
    Napi::Object object = Napi::Object::New(env);
    for (const auto& e : values) object.Set(e.name, static_cast<int>(e.value));
    enums.Set(name, object);
  };
  (add(EnumTable<E>::kName, EnumTable<E>::kValues), ...);
  return enums;
}

// The L2 entry bits walkL2 reads (core/l2_walk.h), exported (`l2EntryBits`) for
// test/qcow2/entries.test.ts to hold equal to src/qcow2/entries.ts. Masks are BigInts: a double
// does not hold 56 bits. compressedOffsetBits is indexed by cluster bits (9 to 21).
Napi::Object l2EntryBitsObject(Napi::Env env) {
  Napi::Object bits = Napi::Object::New(env);
  bits.Set("copied", Napi::BigInt::New(env, kL2CopiedBit));
  bits.Set("compressed", Napi::BigInt::New(env, kL2CompressedBit));
  bits.Set("zero", Napi::BigInt::New(env, kL2ZeroBit));
  bits.Set("offsetMask", Napi::BigInt::New(env, kL2OffsetMask));
  bits.Set("subclustersPerCluster", kSubclustersPerCluster);
  bits.Set("compressedSectorBytes", static_cast<double>(kCompressedSectorBytes));
  Napi::Object offsetBits = Napi::Object::New(env);
  for (uint32_t clusterBits = 9; clusterBits <= 21; clusterBits++) offsetBits.Set(clusterBits, compressedOffsetBits(clusterBits));
  bits.Set("compressedOffsetBits", offsetBits);
  return bits;
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

// The base of every asynchronous call (as classic-level's one BaseWorker): it owns the promise,
// keeps the JavaScript objects a job uses in place (typed arrays, buffers, the object a method
// runs on) alive until it settles, and turns failures into rejections. A job supplies Execute
// (on a worker thread, no JavaScript) and Result (back on the main thread: the value the promise
// resolves to; a Napi::Error thrown there rejects it). Made and queued by start<Job>(...).
class PromiseWorker : public Napi::AsyncWorker {
 public:
  Napi::Promise promise() const { return deferred_.Promise(); }

 protected:
  PromiseWorker(Napi::Env env, const char* resourceName)
      : Napi::AsyncWorker(env, resourceName), deferred_(Napi::Promise::Deferred::New(env)) {}

  virtual Napi::Value Result(Napi::Env env) = 0;
  // Runs first when the job completes, succeeded or not (before the promise settles).
  virtual void Completed() {}

  template <typename T>
  T keep(T object) {
    kept_.push_back(Napi::Persistent(Napi::Object(object.Env(), object)));
    return object;
  }

  // A typed array of exactly this type, used in place.
  template <typename Array>
  Array typedField(const Napi::Object& spec, const char* name, napi_typedarray_type type) {
    Napi::Value value = spec.Get(name);
    if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != type) {
      throw Napi::TypeError::New(spec.Env(), std::string(name) + (type == napi_float64_array ? " must be a Float64Array" : " must be a Uint8Array"));
    }
    return keep(value.As<Array>());
  }
  Napi::Float64Array float64Field(const Napi::Object& spec, const char* name) {
    return typedField<Napi::Float64Array>(spec, name, napi_float64_array);
  }

  // An optional Uint8Array: nullptr when absent.
  const uint8_t* optionalBytes(const Napi::Object& spec, const char* name, size_t* length) {
    if (spec.Get(name).IsUndefined()) return nullptr;
    auto array = typedField<Napi::Uint8Array>(spec, name, napi_uint8_array);
    *length = array.ByteLength();
    return array.Data();
  }

  // An optional BigUint64Array used in place by native threads (counters, hashes).
  uint64_t* bigUint64Field(const Napi::Object& spec, const char* name, size_t minimumLength, size_t* length = nullptr) {
    Napi::Value value = spec.Get(name);
    if (value.IsUndefined()) return nullptr;
    // Given but unusable is an error: counters ignored would make a job impossible to cancel.
    if (!value.IsTypedArray() || value.As<Napi::TypedArray>().TypedArrayType() != napi_biguint64_array ||
        value.As<Napi::TypedArray>().ElementLength() < minimumLength) {
      throw Napi::TypeError::New(spec.Env(), std::string(name) + " must be a BigUint64Array of at least " +
                                                 std::to_string(minimumLength) + " elements");
    }
    auto array = keep(value.As<Napi::TypedArray>());
    if (length) *length = array.ElementLength();
    return reinterpret_cast<uint64_t*>(static_cast<uint8_t*>(array.ArrayBuffer().Data()) + array.ByteOffset());
  }
  CopyCounters* countersField(const Napi::Object& spec) {
    return reinterpret_cast<CopyCounters*>(bigUint64Field(spec, "counters", 4));
  }

 private:
  void OnOK() final {
    Completed();
    Napi::Env env = Env();
    try {
      deferred_.Resolve(Result(env));
    } catch (const Napi::Error& error) {
      deferred_.Reject(error.Value());
    } catch (const std::exception& error) {
      deferred_.Reject(Napi::Error::New(env, error.what()).Value());
    }
  }
  // Execute threw (its message), or the work could not run.
  void OnError(const Napi::Error& error) final {
    Completed();
    deferred_.Reject(error.Value());
  }

  Napi::Promise::Deferred deferred_;
  std::vector<Napi::ObjectReference> kept_;
};

// Makes a job (whose constructor checks its arguments: a throw there is the caller's error, and
// nothing is queued), queues it and returns its promise. The queued worker deletes itself.
template <typename Job, typename... Args>
Napi::Value start(Args&&... args) {
  auto job = std::make_unique<Job>(std::forward<Args>(args)...);
  Napi::Promise promise = job->promise();
  job.release()->Queue();
  return promise;
}

// name(job) -> Promise, for the jobs described by one object.
template <typename Job>
Napi::Value JobFn(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !info[0].IsObject()) {
    throw Napi::TypeError::New(info.Env(), std::string(Job::kFunction) + "(job) needs a job object");
  }
  return start<Job>(info.Env(), info[0].As<Napi::Object>());
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

// A copy-engine failure as the rejection's error: message plus where it happened.
Napi::Error copyError(Napi::Env env, const CopyError& failure) {
  Napi::Object object = Napi::Error::New(env, failure.message).Value();
  object.Set("operation", failure.operation);
  object.Set("errno", failure.errnoValue);
  object.Set("sourceIndex", failure.sourceIndex);
  object.Set("guestOffset", static_cast<double>(failure.guestOffset));
  object.Set("hostOffset", static_cast<double>(failure.hostOffset));
  object.Set("cancelled", failure.cancelled);
  return Napi::Error(env, object);
}

// The plan's enum and index columns: a kind the engine defines, a source index an int holds.
void checkPlanRuns(Napi::Env env, const Napi::Float64Array& runs) {
  for (size_t i = 0; i + kPlanRunFields <= runs.ElementLength(); i += kPlanRunFields) {
    RunKind kind;
    if (!enumFromNumber(runs[i + 2], &kind)) {
      throw Napi::RangeError::New(env, "runs: element " + std::to_string(i + 2) + " (a kind) must be " + enumChoices<RunKind>());
    }
    if (runs[i + 3] > INT32_MAX) {
      throw Napi::RangeError::New(env, "runs: element " + std::to_string(i + 3) + " (a source) is past the int range");
    }
  }
}

// copy(job) -> Promise<void>
class CopyWorker : public PromiseWorker {
  // A source's `stage` (Buffers) and `extents` (Float64Array: fileOffset, length, index in stage
  // and offset there, per extent, sorted and disjoint): where its bytes are read from, not fd.
  void stagedExtents(Napi::Env env, const Napi::Object& s, Source& source) {
    Napi::Value stageValue = s.Get("stage");
    if (stageValue.IsUndefined()) return;
    if (!stageValue.IsArray()) throw Napi::TypeError::New(env, "stage must be an array of Buffers");
    auto stage = stageValue.As<Napi::Array>();
    std::vector<Napi::Buffer<uint8_t>> chunks;
    for (uint32_t i = 0; i < stage.Length(); i++) {
      if (!stage.Get(i).IsBuffer()) throw Napi::TypeError::New(env, "stage must be an array of Buffers");
      chunks.push_back(keep(stage.Get(i).As<Napi::Buffer<uint8_t>>()));
    }
    auto extents = float64Field(s, "extents");
    checkUnsignedElements(env, extents, "extents");
    const double* e = extents.Data();
    uint64_t previousEnd = 0;
    for (size_t i = 0; i + kStagedExtentFields <= extents.ElementLength(); i += kStagedExtentFields) {
      uint64_t file = static_cast<uint64_t>(e[i]), length = static_cast<uint64_t>(e[i + 1]);
      uint64_t chunk = static_cast<uint64_t>(e[i + 2]), at = static_cast<uint64_t>(e[i + 3]);
      if (chunk >= chunks.size() || at > chunks[chunk].Length() || length > chunks[chunk].Length() - at || file < previousEnd) {
        throw Napi::RangeError::New(env, "extents: an extent lies outside its stage or out of order");
      }
      source.staged.push_back(StagedExtent{file, length, chunks[chunk].Data() + at});
      previousEnd = file + length;
    }
  }

 public:
  static constexpr const char* kFunction = "copy";
  CopyWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:copy") {
    auto runs = float64Field(spec, "runs");
    checkUnsignedElements(env, runs, "runs");
    checkPlanRuns(env, runs);
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
                                    enumField(s, "codec", Codec::Deflate),
                                    unsignedField(s, "clusterSize", 65536),
                                    unsignedField(s, "base"),
                                    {}});
      stagedExtents(env, s, job_.sources.back());
    }
    job_.targetFd = intField(spec, "targetFd", -1);
    job_.targetTailFd = intField(spec, "targetTailFd", -1);
    // A memory target is written by worker threads: it must not be transferred (detached)
    // before the promise settles. Image.read documents this for its callers.
    Napi::Value memory = spec.Get("memory");
    if (!memory.IsUndefined() && !memory.IsBuffer()) throw Napi::TypeError::New(env, "memory must be a Buffer");
    if (memory.IsBuffer()) {
      auto buffer = keep(memory.As<Napi::Buffer<uint8_t>>());
      job_.memory = buffer.Data();
      job_.memoryLength = buffer.Length();
      job_.memoryGuestOffset = unsignedField(spec, "memoryGuestOffset");
    }
    job_.targetBase = unsignedField(spec, "targetBase");
    job_.limitStart = unsignedField(spec, "limitStart");
    job_.limitEnd = unsignedField(spec, "limitEnd");
    job_.alignment = uint32Field(spec, "alignment");
    job_.zeroMode = enumField(spec, "zeroMode", ZeroMode::Skip);
    job_.threads = uint32Field(spec, "threads", 4);
    job_.windowSize = unsignedField(spec, "windowSize", 1 << 20);
    job_.counters = countersField(spec);
    size_t hashWords = 0;
    job_.windowHashes = bigUint64Field(spec, "windowHashes", 2, &hashWords);
    job_.windowHashCount = hashWords / 2;
    job_.hashedSize = unsignedField(spec, "hashedSize");
    // extraTargets: [{fd, tailFd, base, limitStart, limitEnd, alignment, zeroMode}]. With it the
    // job resolves to one entry per target (its own first): null, or the error that stopped it.
    Napi::Value extra = spec.Get("extraTargets");
    if (!extra.IsUndefined()) {
      if (!extra.IsArray()) throw Napi::TypeError::New(env, "extraTargets must be an array");
      if (job_.memory != nullptr) throw Napi::TypeError::New(env, "extraTargets cannot go with memory");
      auto list = extra.As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); i++) {
        Napi::Value entry = list.Get(i);
        if (!entry.IsObject()) throw Napi::TypeError::New(env, "extraTargets must hold objects");
        Napi::Object t = entry.As<Napi::Object>();
        job_.extraTargets.push_back(ExtraTarget{intField(t, "fd", -1), intField(t, "tailFd", -1), unsignedField(t, "base"),
                                                unsignedField(t, "limitStart"), unsignedField(t, "limitEnd"),
                                                uint32Field(t, "alignment"), enumField(t, "zeroMode", ZeroMode::Skip)});
      }
      perTarget_ = true;
    }
  }
  void Execute() override { result_ = perTarget_ ? runCopyJob(job_, &targetErrors_) : runCopyJob(job_); }
  Napi::Value Result(Napi::Env env) override {
    if (perTarget_) {
      // Only a failure of the job as such (read, decompress, plan, cancel) rejects; a target's
      // own failure is its entry, even when every target failed.
      bool allTargets = !targetErrors_.empty();
      for (const CopyError& e : targetErrors_) allTargets = allTargets && e.failed;
      if (result_.failed && !allTargets) throw copyError(env, result_);
      Napi::Array out = Napi::Array::New(env, targetErrors_.size());
      for (uint32_t i = 0; i < targetErrors_.size(); i++) {
        out.Set(i, targetErrors_[i].failed ? copyError(env, targetErrors_[i]).Value() : env.Null());
      }
      return out;
    }
    if (result_.failed) throw copyError(env, result_);
    return env.Undefined();
  }

 private:
  CopyJob job_;
  CopyError result_;
  bool perTarget_ = false;
  std::vector<CopyError> targetErrors_;
};

// verify(job) -> Promise<number>: the first window whose bytes differ, or -1.
class VerifyWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "verify";
  VerifyWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:verify") {
    job_.fd = intField(spec, "fd", -1);
    job_.base = unsignedField(spec, "base");
    job_.size = unsignedField(spec, "size");
    job_.windowSize = unsignedField(spec, "windowSize", 1 << 20);
    job_.alignment = uint32Field(spec, "alignment");
    job_.threads = uint32Field(spec, "threads", 4);
    size_t hashWords = 0;
    job_.windowHashes = bigUint64Field(spec, "windowHashes", 2, &hashWords);
    job_.windowHashCount = hashWords / 2;
    job_.counters = countersField(spec);
  }
  void Execute() override { result_ = runVerifyJob(job_); }
  Napi::Value Result(Napi::Env env) override {
    if (result_.error.failed) throw copyError(env, result_.error);
    return Napi::Number::New(env, static_cast<double>(result_.firstBadWindow));
  }

 private:
  VerifyJob job_;
  VerifyResult result_;
};

// capture(job) -> Promise<number>: the output position after the stored bytes.
class CaptureWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "capture";
  CaptureWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:capture") {
    job_.sourceFd = intField(spec, "sourceFd", -1);
    job_.sourceAlignment = uint32Field(spec, "sourceAlignment");
    job_.sourceSize = unsignedField(spec, "sourceSize");
    job_.guestStart = unsignedField(spec, "guestStart");
    job_.clusterCount = unsignedField(spec, "clusterCount");
    job_.clusterSize = unsignedField(spec, "clusterSize", 65536);
    job_.zeroAsData = spec.Get("zeroAsData").ToBoolean();
    job_.codec = enumField(spec, "codec", Codec::None);
    job_.level = intField(spec, "level");
    job_.outputFd = intField(spec, "outputFd", -1);
    job_.outputDirectFd = intField(spec, "outputDirectFd", -1);
    job_.outputDirectAlignment = uint32Field(spec, "outputDirectAlignment");
    job_.outputPosition = unsignedField(spec, "outputPosition");
    job_.threads = uint32Field(spec, "threads", 2);
    auto results = float64Field(spec, "results");
    job_.results = results.Data();
    size_t resultCapacity = results.ElementLength() / kCaptureResultFields;
    size_t holesLength = 0, baseLength = 0;
    job_.holes = optionalBytes(spec, "holes", &holesLength);
    job_.base = optionalBytes(spec, "base", &baseLength);
    job_.counters = countersField(spec);
    // A direct read is whole units of the source inside one cluster's room in the buffer.
    bool alignment = job_.sourceAlignment == 0 ||
                     (job_.sourceAlignment <= job_.clusterSize && job_.clusterSize % job_.sourceAlignment == 0);
    if (!(resultCapacity >= job_.clusterCount && job_.clusterSize >= 512 && alignment &&
          (!job_.holes || holesLength >= job_.clusterCount) &&
          (!job_.base || baseLength / job_.clusterSize >= job_.clusterCount))) {
      throw Napi::RangeError::New(env, "capture: results, holes or base shorter than the cluster range, or a source alignment that does not divide the cluster size");
    }
  }
  void Execute() override { result_ = runCaptureJob(job_); }
  Napi::Value Result(Napi::Env env) override {
    if (result_.error.failed) throw copyError(env, result_.error);
    return Napi::Number::New(env, static_cast<double>(result_.outputPosition));
  }

 private:
  CaptureJob job_;
  CaptureResult result_;
};

// writeBench(job) -> Promise<{bytes, writes, seconds, p50Us, p99Us, p999Us, engine}>
class WriteBenchWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "writeBench";
  WriteBenchWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:bench") {
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
    job_.engine = enumField(spec, "engine", BenchEngine::Auto);
    job_.seed = unsignedField(spec, "seed", 1);
    job_.counters = countersField(spec);
  }
  void Execute() override { result_ = runWriteBench(job_); }
  Napi::Value Result(Napi::Env env) override {
    if (result_.error.failed) throw copyError(env, result_.error);
    Napi::Object out = Napi::Object::New(env);
    out.Set("bytes", static_cast<double>(result_.bytes));
    out.Set("writes", static_cast<double>(result_.writes));
    out.Set("seconds", result_.seconds);
    out.Set("p50Us", result_.p50Us);
    out.Set("p99Us", result_.p99Us);
    out.Set("p999Us", result_.p999Us);
    out.Set("engine", result_.engine);
    return out;
  }

 private:
  WriteBenchJob job_;
  WriteBenchResult result_;
};

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

// Bytes moved to JavaScript without a copy: the Buffer owns the vector.
Napi::Buffer<uint8_t> bufferOf(Napi::Env env, std::vector<uint8_t>&& bytes) {
  auto* owned = new std::vector<uint8_t>(std::move(bytes));
  return Napi::Buffer<uint8_t>::New(env, owned->data(), owned->size(),
                                    [](Napi::Env, uint8_t*, std::vector<uint8_t>* v) { delete v; }, owned);
}

// processDumpBatch(job) -> Promise<{states, duplicates, chunks}>
class DumpBatchWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "processDumpBatch";
  DumpBatchWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:dump") {
    batch_.sourceFd = intField(spec, "sourceFd", -1);
    batch_.dumpOffset = unsignedField(spec, "dumpOffset");
    batch_.firstPage = unsignedField(spec, "firstPage");
    batch_.pageCount = unsignedField(spec, "pageCount");
    batch_.pageSize = uint32Field(spec, "pageSize", 4096);
    batch_.spanPages = uint32Field(spec, "spanPages", 512);
    batch_.firstSpan = unsignedField(spec, "firstSpan");
    batch_.incremental = spec.Get("incremental").ToBoolean();
    batch_.codec = enumField(spec, "codec", Codec::Zstd);
    batch_.level = intField(spec, "level", 1);
    batch_.chunkTargetBytes = unsignedField(spec, "chunkTargetBytes", 1 << 20);
    batch_.threads = uint32Field(spec, "threads", 2);
    size_t parentLength = 0, dirtyLength = 0, holesLength = 0;
    batch_.parent = optionalBytes(spec, "parent", &parentLength);
    batch_.dirty = optionalBytes(spec, "dirty", &dirtyLength);
    batch_.holes = optionalBytes(spec, "holes", &holesLength);
    Napi::Value dedup = spec.Get("dedup");
    auto* dedupConstructor = env.GetInstanceData<Napi::FunctionReference>();
    if (dedup.IsObject() && dedupConstructor && dedup.As<Napi::Object>().InstanceOf(dedupConstructor->Value())) {
      batch_.dedup = &DedupTableWrap::Unwrap(keep(dedup.As<Napi::Object>()))->table;
    }
    // The parent must hold every page of the batch; a product that wraps would let a short one
    // pass. A chunk's raw length is a uint32: a span and a chunk target well under 4 GiB keep it so.
    bool pagesFit = batch_.pageSize != 0 && batch_.pageCount <= UINT64_MAX / batch_.pageSize;
    if (!(batch_.pageSize >= 512 && batch_.spanPages > 0 && pagesFit &&
          static_cast<uint64_t>(batch_.pageSize) * batch_.spanPages <= (64ULL << 20) &&
          batch_.chunkTargetBytes <= (256ULL << 20) &&
          (!batch_.parent || parentLength >= batch_.pageCount * batch_.pageSize) &&
          (!batch_.dirty || dirtyLength >= (batch_.pageCount + 7) / 8) &&
          (!batch_.holes || holesLength >= batch_.pageCount) &&
          (!batch_.incremental || batch_.parent || batch_.dirty))) {
      throw Napi::RangeError::New(env, "processDumpBatch: inconsistent batch (sizes, parent, dirty bitmap or holes)");
    }
  }
  void Execute() override { result_ = processDumpBatch(batch_); }
  Napi::Value Result(Napi::Env env) override {
    if (!result_.error.empty()) throw Napi::Error::New(env, result_.error);
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
      chunk.Set("stored", bufferOf(env, std::move(c.stored)));
      chunks[i] = chunk;
    }
    out.Set("chunks", chunks);
    return out;
  }

 private:
  DumpBatch batch_;
  DumpBatchResult result_;
};

// restoreBatch(job) -> Promise<number>: the data bytes written.
class RestoreBatchWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "restoreBatch";
  RestoreBatchWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:restore") {
    batch_.stateFd = intField(spec, "stateFd", -1);
    batch_.outputFd = intField(spec, "outputFd", -1);
    batch_.pageSize = uint32Field(spec, "pageSize", 4096);
    batch_.spanPages = uint32Field(spec, "spanPages", 512);
    batch_.firstSpan = unsignedField(spec, "firstSpan");
    batch_.punchZeros = spec.Get("punchZeros").ToBoolean();
    batch_.startWriteback = spec.Get("startWriteback").ToBoolean();
    batch_.threads = uint32Field(spec, "threads", 2);
    // The output as memory: a Uint8Array (over an ArrayBuffer or a SharedArrayBuffer) used in
    // place, or outputFd mapped for the batch.
    if (!spec.Get("outputBuffer").IsUndefined()) {
      auto output = typedField<Napi::Uint8Array>(spec, "outputBuffer", napi_uint8_array);
      batch_.outputMemory = output.Data();
      batch_.outputLength = output.ByteLength();
    } else if (spec.Get("mapOutput").ToBoolean()) {
      batch_.mapOutput = true;
      batch_.outputLength = unsignedField(spec, "outputLength");
    }
    auto spans = float64Field(spec, "spans");  // pairs: page count, dump offset
    checkUnsignedElements(env, spans, "spans");
    for (size_t i = 0; i + 1 < spans.ElementLength(); i += 2) {
      if (spans[i] > UINT32_MAX) throw Napi::RangeError::New(env, "spans: a page count over 2^32");
      batch_.spanPageCounts.push_back(static_cast<uint32_t>(spans[i]));
      batch_.spanDumpOffsets.push_back(static_cast<uint64_t>(spans[i + 1]));
    }
    auto states = typedField<Napi::Uint8Array>(spec, "states", napi_uint8_array);
    for (size_t i = 0; i < states.ElementLength(); i++) {
      PageState state;
      if (!enumFromNumber(states[i], &state)) {
        throw Napi::RangeError::New(env, "states: element " + std::to_string(i) + " must be " + enumChoices<PageState>());
      }
    }
    batch_.states = states.Data();
    auto chunks = float64Field(spec, "chunks");  // payload offset, length, checksum as two u32
    checkUnsignedElements(env, chunks, "chunks");
    for (size_t i = 0; i + 3 < chunks.ElementLength(); i += 4) {
      uint64_t checksum = (static_cast<uint64_t>(chunks[i + 2]) << 32) | static_cast<uint64_t>(chunks[i + 3]);
      batch_.chunks.push_back(RestoreChunk{static_cast<uint64_t>(chunks[i]), static_cast<uint64_t>(chunks[i + 1]), checksum});
    }
    auto duplicates = float64Field(spec, "duplicates");
    checkUnsignedElements(env, duplicates, "duplicates");
    for (size_t i = 0; i < duplicates.ElementLength(); i++) batch_.duplicates.push_back(static_cast<uint64_t>(duplicates[i]));
    size_t pages = 0;
    for (uint32_t n : batch_.spanPageCounts) pages += n;
    if (!(pages <= states.ElementLength() && batch_.pageSize >= 512 && batch_.spanPages > 0)) {
      throw Napi::RangeError::New(env, "restoreBatch: states shorter than the spans");
    }
  }
  void Execute() override { result_ = restoreBatch(batch_); }
  Napi::Value Result(Napi::Env env) override {
    if (!result_.error.empty()) {
      Napi::Error error = Napi::Error::New(env, result_.error);
      error.Set("badChunk", Napi::Number::New(env, static_cast<double>(result_.badChunk)));
      if (result_.outputFailed) error.Set("operation", "write");
      throw error;
    }
    return Napi::Number::New(env, static_cast<double>(result_.dataBytes));
  }

 private:
  RestoreBatch batch_;
  RestoreBatchResult result_;
};

// decompressChunk(codec, stored, rawLength) -> Promise<Buffer>
class DecompressChunkWorker : public PromiseWorker {
 public:
  DecompressChunkWorker(Napi::Env env, Codec codec, Napi::Buffer<uint8_t> stored, size_t rawLength)
      : PromiseWorker(env, "qcow2img:chunk"), codec_(codec), stored_(keep(stored).Data()), storedLength_(stored.Length()),
        output_(rawLength) {}
  void Execute() override { ok_ = decompressChunk(codec_, stored_, storedLength_, output_.data(), output_.size()); }
  Napi::Value Result(Napi::Env env) override {
    if (!ok_) throw Napi::Error::New(env, "chunk does not decompress to its length");
    return bufferOf(env, std::move(output_));
  }

 private:
  Codec codec_;
  const uint8_t* stored_;
  size_t storedLength_;
  std::vector<uint8_t> output_;
  bool ok_ = false;
};

Napi::Value DecompressChunkFn(const Napi::CallbackInfo& info) {
  if (info.Length() < 3 || !info[1].IsBuffer()) throw Napi::TypeError::New(info.Env(), "decompressChunk(codec, stored, rawLength)");
  uint64_t rawLength = unsignedArg(info, 2, "rawLength");
  if (rawLength > (1u << 30)) throw Napi::RangeError::New(info.Env(), "decompressChunk: raw length out of range");
  Codec codec = enumValue<Codec>(info.Env(), info[0], "codec");
  return start<DecompressChunkWorker>(info.Env(), codec, info[1].As<Napi::Buffer<uint8_t>>(), static_cast<size_t>(rawLength));
}

// startWriteback(fd, offset, length) -> Promise<0 or errno>, off the JavaScript thread:
// sync_file_range may wait for a congested device's queue.
class WritebackWorker : public PromiseWorker {
 public:
  WritebackWorker(Napi::Env env, int fd, uint64_t offset, uint64_t length)
      : PromiseWorker(env, "qcow2img:writeback"), fd_(fd), offset_(offset), length_(length) {}
  void Execute() override { errno_ = startWriteback(fd_, offset_, length_); }
  Napi::Value Result(Napi::Env env) override { return Napi::Number::New(env, errno_); }

 private:
  int fd_;
  uint64_t offset_;
  uint64_t length_;
  int errno_ = 0;
};

Napi::Value StartWritebackFn(const Napi::CallbackInfo& info) {
  return start<WritebackWorker>(info.Env(), intArg(info, 0, "fd"), unsignedArg(info, 1, "offset"), unsignedArg(info, 2, "length"));
}

// httpGet({family, address, port, idle, connections, timeoutMs, counters, pieces: [{request, into}]})
//   -> Promise<{pieces: [{head, received, failure}], idle}>: ranged GETs whose bodies go into
// `into` (each Buffer's length is the body expected); `idle` are kept-alive sockets, in and out.
class HttpGetWorker : public PromiseWorker {
 public:
  static constexpr const char* kFunction = "httpGet";
  HttpGetWorker(Napi::Env env, const Napi::Object& spec) : PromiseWorker(env, "qcow2img:http") {
    job_.family = intField(spec, "family", 4);
    Napi::Value address = spec.Get("address");
    if (!address.IsString()) throw Napi::TypeError::New(env, "address must be a string");
    job_.address = address.As<Napi::String>().Utf8Value();
    job_.port = intField(spec, "port", 80);
    job_.connections = uint32Field(spec, "connections", 8);
    job_.timeoutMs = intField(spec, "timeoutMs", 30000);
    CopyCounters* counters = countersField(spec);
    if (counters != nullptr) job_.cancel = &counters->cancel;
    Napi::Value idle = spec.Get("idle");
    if (idle.IsArray()) {
      auto list = idle.As<Napi::Array>();
      for (uint32_t i = 0; i < list.Length(); i++) job_.idle.push_back(list.Get(i).As<Napi::Number>().Int32Value());
    }
    Napi::Value pieces = spec.Get("pieces");
    if (!pieces.IsArray()) throw Napi::TypeError::New(env, "pieces must be an array");
    auto list = pieces.As<Napi::Array>();
    for (uint32_t i = 0; i < list.Length(); i++) {
      Napi::Value entry = list.Get(i);
      if (!entry.IsObject()) throw Napi::TypeError::New(env, "pieces must hold objects");
      Napi::Object p = entry.As<Napi::Object>();
      if (!p.Get("request").IsBuffer() || !p.Get("into").IsBuffer()) throw Napi::TypeError::New(env, "a piece needs request and into Buffers");
      auto request = keep(p.Get("request").As<Napi::Buffer<uint8_t>>());
      auto into = keep(p.Get("into").As<Napi::Buffer<uint8_t>>());
      HttpPiece piece;
      piece.request = request.Data();
      piece.requestLength = request.Length();
      piece.into = into.Data();
      piece.length = into.Length();
      job_.pieces.push_back(std::move(piece));
    }
  }
  void Execute() override { runHttpGets(job_); }
  Napi::Value Result(Napi::Env env) override {
    Napi::Object result = Napi::Object::New(env);
    Napi::Array pieces = Napi::Array::New(env, job_.pieces.size());
    for (size_t i = 0; i < job_.pieces.size(); i++) {
      const HttpPiece& piece = job_.pieces[i];
      Napi::Object p = Napi::Object::New(env);
      p.Set("head", piece.head);
      p.Set("received", static_cast<double>(piece.received));
      p.Set("failure", piece.failure);
      pieces.Set(static_cast<uint32_t>(i), p);
    }
    Napi::Array idle = Napi::Array::New(env, job_.idle.size());
    for (size_t i = 0; i < job_.idle.size(); i++) idle.Set(static_cast<uint32_t>(i), job_.idle[i]);
    result.Set("pieces", pieces);
    result.Set("idle", idle);
    return result;
  }

 private:
  HttpGetJob job_;
};

// hashFile(fd, offset = 0, length = to the end) -> Promise<bigint>: XXH3-64 of those bytes.
class HashFileWorker : public PromiseWorker {
 public:
  HashFileWorker(Napi::Env env, int fd, uint64_t offset, uint64_t length)
      : PromiseWorker(env, "qcow2img:hash"), fd_(fd), offset_(offset), length_(length) {}
  void Execute() override { ok_ = hashFile(fd_, offset_, length_, &hash_); }
  Napi::Value Result(Napi::Env env) override {
    if (!ok_) throw Napi::Error::New(env, "read error while hashing");
    return Napi::BigInt::New(env, hash_);
  }

 private:
  int fd_;
  uint64_t offset_, length_;
  uint64_t hash_ = 0;
  bool ok_ = false;
};

Napi::Value HashFileFn(const Napi::CallbackInfo& info) {
  int fd = intArg(info, 0, "fd");
  uint64_t offset = info.Length() > 1 && !info[1].IsUndefined() ? unsignedArg(info, 1, "offset") : 0;
  uint64_t length = info.Length() > 2 && !info[2].IsUndefined() ? unsignedArg(info, 2, "length") : UINT64_MAX;
  return start<HashFileWorker>(info.Env(), fd, offset, length);
}

// hash64(buffer | buffers) -> bigint (of the buffers one after another); hash128(buffer) -> Buffer of 16 bytes (low then high, little-endian)
bool isBytes(const Napi::Value& value) {
  return value.IsTypedArray() && value.As<Napi::TypedArray>().TypedArrayType() == napi_uint8_array;
}

Napi::Uint8Array bytesArg(const Napi::CallbackInfo& info) {
  if (info.Length() < 1 || !isBytes(info[0])) {
    throw Napi::TypeError::New(info.Env(), "a Uint8Array or Buffer is expected");
  }
  return info[0].As<Napi::Uint8Array>();
}

Napi::Value Hash64(const Napi::CallbackInfo& info) {
  if (info.Length() >= 1 && info[0].IsArray()) {
    Napi::Array array = info[0].As<Napi::Array>();
    std::vector<ByteSpan> parts;
    for (uint32_t i = 0; i < array.Length(); i++) {
      Napi::Value part = array.Get(i);
      if (!isBytes(part)) {
        throw Napi::TypeError::New(info.Env(), "hash64: parts must be Uint8Arrays or Buffers");
      }
      auto bytes = part.As<Napi::Uint8Array>();
      parts.push_back(ByteSpan{bytes.Data(), bytes.ByteLength()});
    }
    return Napi::BigInt::New(info.Env(), hash64(parts));
  }
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

// alignedBuffer(bytes) -> a Buffer whose memory starts on a 4 KiB boundary, so that native code
// can write it with O_DIRECT as it lies (remote images' stage chunks).
Napi::Value AlignedBufferFn(const Napi::CallbackInfo& info) {
  uint64_t bytes = unsignedArg(info, 0, "bytes");
  if (bytes == 0 || bytes > (1ULL << 30)) throw Napi::RangeError::New(info.Env(), "alignedBuffer: bytes must be 1 to 1 GiB");
  void* memory = nullptr;
  if (posix_memalign(&memory, 4096, bytes) != 0) throw Napi::Error::New(info.Env(), "alignedBuffer: out of memory");
  return Napi::Buffer<uint8_t>::New(info.Env(), static_cast<uint8_t*>(memory), bytes,
                                    [](Napi::Env, uint8_t* data) { free(data); });
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
  class StepWorker : public PromiseWorker {
   public:
    StepWorker(Napi::Env env, ZstdStreamWrap* owner, Napi::Buffer<uint8_t> input, Napi::Buffer<uint8_t> output, bool end)
        : PromiseWorker(env, "qcow2img:zstd-stream"), owner_(owner), input_(keep(input).Data()), inputSize_(input.Length()),
          output_(keep(output).Data()), outputSize_(output.Length()), end_(end) {
      keep(owner->Value());
    }
    void Execute() override { result_ = owner_->stream_->step(input_, inputSize_, output_, outputSize_, end_); }
    void Completed() override { owner_->busy_ = false; }
    Napi::Value Result(Napi::Env env) override {
      if (!result_.error.empty()) throw Napi::Error::New(env, "zstd: " + result_.error);
      Napi::Object object = Napi::Object::New(env);
      object.Set("consumed", static_cast<double>(result_.consumed));
      object.Set("produced", static_cast<double>(result_.produced));
      object.Set("finished", result_.finished);
      return object;
    }

   private:
    ZstdStreamWrap* owner_;
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
    Napi::Value promise = start<StepWorker>(info.Env(), this, info[0].As<Napi::Buffer<uint8_t>>(),
                                            info[1].As<Napi::Buffer<uint8_t>>(), info[2].ToBoolean());
    busy_ = true;  // until the step completes (it cannot before this call returns)
    return promise;
  }

  std::unique_ptr<ZstdStream> stream_;
  bool busy_ = false;
};

template <typename Job>
void exportJob(Napi::Env env, Napi::Object exports) {
  exports.Set(Job::kFunction, Napi::Function::New(env, JobFn<Job>, Job::kFunction));
}

Napi::Object Init(Napi::Env env, Napi::Object exports) {
  exports.Set("enums", enumsObject<Codec, ZeroMode, RunKind, BenchEngine, PageState, UnitKind>(env));
  exports.Set("l2EntryBits", l2EntryBitsObject(env));
  exports.Set("walkL2", Napi::Function::New(env, WalkL2, "walkL2"));
  exportJob<CopyWorker>(env, exports);
  exportJob<VerifyWorker>(env, exports);
  exportJob<CaptureWorker>(env, exports);
  exportJob<WriteBenchWorker>(env, exports);
  exportJob<HttpGetWorker>(env, exports);
  Napi::Function dedup = DedupTableWrap::Define(env);
  // Per environment (worker threads load the addon again), freed with it.
  env.SetInstanceData<Napi::FunctionReference>(new Napi::FunctionReference(Napi::Persistent(dedup)));
  exports.Set("DedupTable", dedup);
  exports.Set("ZstdStream", ZstdStreamWrap::Define(env));
  exportJob<DumpBatchWorker>(env, exports);
  exportJob<RestoreBatchWorker>(env, exports);
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
  exports.Set("startWriteback", Napi::Function::New(env, StartWritebackFn, "startWriteback"));
  exports.Set("lockByte", Napi::Function::New(env, ByteLockFn<lockByte>, "lockByte"));
  exports.Set("byteLocked", Napi::Function::New(env, ByteLockFn<byteLocked>, "byteLocked"));
  exports.Set("alignedBuffer", Napi::Function::New(env, AlignedBufferFn, "alignedBuffer"));
  exports.Set("directIoAlignment", Napi::Function::New(env, DirectIoAlignment, "directIoAlignment"));
  return exports;
}

}  // namespace

NODE_API_MODULE(qcow2img, Init)
